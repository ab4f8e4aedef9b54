import Foundation
import NixFormats

/// Feeds one input to the NAR reader in two pieces (exercising the split paths) and re-encodes
/// what it accepts: a valid parse must re-encode to the same bytes.
func fuzzOne(_ bytes: UnsafeRawBufferPointer) {
  let split = bytes.isEmpty ? 0 : Int(bytes[0]) % (bytes.count + 1)
  var reader = NARReader()
  var writer = NARWriter()
  var out: [UInt8] = []
  do {
    try reader.feed(UnsafeRawBufferPointer(rebasing: bytes[0..<split])) { try writer.write($0) }
    out += writer.take()
    try reader.feed(UnsafeRawBufferPointer(rebasing: bytes[split...])) { try writer.write($0) }
    out += writer.take()
    try reader.finish()
  } catch is NARError {
    return
  } catch {
    fatalError("unexpected error type: \(error)")
  }
  guard out.elementsEqual(bytes) else { fatalError("accepted NAR does not re-encode to the same bytes") }
}

#if FUZZING
  import CFuzzSupport

  @main struct Fuzz {
    static func main() {
      var argc = CommandLine.argc
      var argv: UnsafeMutablePointer<UnsafeMutablePointer<CChar>?>? = CommandLine.unsafeArgv
      let status = LLVMFuzzerRunDriver(&argc, &argv) { data, size in
        fuzzOne(UnsafeRawBufferPointer(start: data, count: size))
        return 0
      }
      exit(status)
    }
  }
#else
  // Without libFuzzer: replay the files given as arguments (a corpus or a crash).
  @main struct Replay {
    static func main() {
      for path in CommandLine.arguments.dropFirst() {
        let data = FileManager.default.contents(atPath: path) ?? Data()
        data.withUnsafeBytes { fuzzOne($0) }
      }
    }
  }
#endif
