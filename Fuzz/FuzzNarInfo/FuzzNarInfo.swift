import Foundation
import NixFormats

/// Parses one input as a narinfo; what parses must serialise and parse back to the same value.
func fuzzOne(_ bytes: UnsafeRawBufferPointer) {
  let text = String(decoding: bytes, as: UTF8.self)
  guard let info = try? NarInfo(parsing: text) else { return }
  guard let again = try? NarInfo(parsing: info.serialized), again == info else {
    fatalError("narinfo does not survive serialise/parse: \(info.serialized)")
  }
  _ = try? info.verify(trusting: TrustedKeys([]))
  _ = try? NixCacheInfo(parsing: text)
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
