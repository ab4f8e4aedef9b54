import Foundation
import FuzzDriver
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

@main struct Fuzz {
  static func main() { fuzzMain(fuzzOne) }
}
