import Foundation
import FuzzDriver
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

@main struct Fuzz {
  static func main() { fuzzMain(fuzzOne) }
}
