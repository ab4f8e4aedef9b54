/// Nix's base-32: alphabet without e, o, t, u; the bytes are read as a little-endian integer and
/// written most significant digit first.
public enum Nix32 {
  static let alphabet: [UInt8] = Array("0123456789abcdfghijklmnpqrsvwxyz".utf8)

  static let digitValue: [Int8] = {
    var table = [Int8](repeating: -1, count: 256)
    for (i, c) in alphabet.enumerated() { table[Int(c)] = Int8(i) }
    return table
  }()

  /// Characters needed for `byteCount` bytes: 20 -> 32, 32 -> 52.
  public static func encodedLength(byteCount: Int) -> Int {
    byteCount == 0 ? 0 : (byteCount * 8 - 1) / 5 + 1
  }

  public static func encode(_ bytes: some Collection<UInt8>) -> String {
    let b = Array(bytes)
    let length = encodedLength(byteCount: b.count)
    var out = [UInt8]()
    out.reserveCapacity(length)
    for n in stride(from: length - 1, through: 0, by: -1) {
      let bit = n * 5
      let i = bit / 8
      let j = bit % 8
      var c = Int(b[i]) >> j
      if i + 1 < b.count { c |= Int(b[i + 1]) << (8 - j) }
      out.append(alphabet[c & 0x1f])
    }
    return String(decoding: out, as: UTF8.self)
  }

  /// Decodes `text` into `byteCount` bytes; nil when a character is outside the alphabet, the
  /// length does not match, or the value has bits beyond `byteCount` bytes.
  public static func decode(_ text: some StringProtocol, byteCount: Int) -> [UInt8]? {
    let chars = Array(text.utf8)
    guard chars.count == encodedLength(byteCount: byteCount) else { return nil }
    var out = [UInt8](repeating: 0, count: byteCount)
    for n in 0..<chars.count {
      let digit = Int(digitValue[Int(chars[chars.count - n - 1])])
      guard digit >= 0 else { return nil }
      let bit = n * 5
      let i = bit / 8
      let j = bit % 8
      out[i] |= UInt8(truncatingIfNeeded: digit << j)
      let carry = digit >> (8 - j)
      if i + 1 < byteCount {
        out[i + 1] |= UInt8(truncatingIfNeeded: carry)
      } else if carry != 0 {
        return nil
      }
    }
    return out
  }

  /// True when every character is in the alphabet.
  public static func isValid(_ text: some StringProtocol) -> Bool {
    text.utf8.allSatisfy { digitValue[Int($0)] >= 0 }
  }
}
