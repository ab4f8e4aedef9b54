/// Text from the outside (URLs, narinfo values, volume IDs) as it may appear in an error or a log
/// line: control characters escaped, and cut to a bound, so a hostile cache or client can neither
/// forge log lines nor fill a disk by making us repeat a 7 MiB value on every retry.
public enum LogText {
  /// The default bound for one quoted value, in characters.
  public static let defaultLimit = 256

  /// `text` with C0 controls, DEL and C1 controls as `\xNN`, cut after `limit` characters with
  /// how much was left out.
  public static func bounded(_ text: some StringProtocol, limit: Int = defaultLimit) -> String {
    var out = ""
    var kept = 0
    for scalar in text.unicodeScalars {
      if kept == limit {
        let rest = text.utf8.count - out.utf8.count
        return out + "…(\(max(rest, 1)) more bytes)"
      }
      let v = scalar.value
      if v < 0x20 || (0x7f...0x9f).contains(v) {
        out += "\\x" + (v < 0x10 ? "0" : "") + String(v, radix: 16)
      } else {
        out.unicodeScalars.append(scalar)
      }
      kept += 1
    }
    return out
  }

  /// Bytes that should be text (a NAR entry name, a narinfo line), bounded the same way.
  public static func bounded(bytes: some Collection<UInt8>, limit: Int = 64) -> String {
    let s = String(decoding: bytes.prefix(limit), as: UTF8.self)
    return bounded(s, limit: limit) + (bytes.count > limit ? "…" : "")
  }
}

func printable(_ bytes: some Collection<UInt8>, limit: Int = 64) -> String {
  LogText.bounded(bytes: bytes, limit: limit)
}
