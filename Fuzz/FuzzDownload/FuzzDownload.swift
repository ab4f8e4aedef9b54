import BinaryCache
import Foundation
import FuzzDriver
import NixFormats

/// What one cache controls beyond the signed fingerprint: the narinfo's URL and the bytes of the
/// NAR file. The input's first byte picks the compression; the input as text is tried as a URL
/// below an http and a file substituter, the rest as a NAR file. Nothing may crash, hang or grow
/// without bound, and a URL that passes must stay below its substituter.
func fuzzOne(_ bytes: UnsafeRawBufferPointer) {
  guard let first = bytes.first else { return }
  let text = String(decoding: bytes.dropFirst(), as: UTF8.self)
  for base in ["http://cache.example:8080/sub", "file:///var/cache/nix"] {
    guard let url = try? BinaryCacheClient.narURL(text, substituter: base) else { continue }
    if url.hasPrefix(base + "/") {
      // Below the substituter, with no way back up.
      let rest = url.dropFirst(base.count + 1)
      guard !rest.split(separator: "/").contains(where: { $0 == ".." || $0 == "." }), !rest.contains("%") else {
        fatalError("escaped: \(url)")
      }
    } else {
      // Absolute: only http(s), only to the substituter's own host and port.
      guard base.hasPrefix("http"), let c = URLComponents(string: url),
        ["http", "https"].contains(c.scheme?.lowercased() ?? ""), c.host?.lowercased() == "cache.example",
        (c.port ?? (c.scheme?.lowercased() == "https" ? 443 : 80)) == 8080
      else { fatalError("escaped: \(url)") }
    }
  }
  let compression = ["none", "xz", "zstd", "bzip2"][Int(first) % 4]
  let narinfo = """
    StorePath: /nix/store/00000000000000000000000000000000-fuzz
    URL: nar/x
    Compression: \(compression)
    NarHash: sha256:0mdqa9w1p6cmli6976v4wi0sw9r4p5prkj7lzfd1877wk11c9c73
    NarSize: 4096

    """
  guard let info = try? NarInfo(parsing: narinfo) else { fatalError("the template narinfo does not parse") }
  let sink = NARBuffer()
  _ = try? BinaryCacheClient.verifyNARFile(UnsafeRawBufferPointer(rebasing: bytes.dropFirst()), info: info, source: "fuzz", into: sink)
  guard sink.bytes.count <= 4096 else { fatalError("the sink got more than NarSize") }
}

@main struct Fuzz {
  static func main() { fuzzMain(fuzzOne) }
}
