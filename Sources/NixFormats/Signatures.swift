import Crypto
import Foundation

/// `name:base64(signature)` as in a narinfo's `Sig:` line.
public struct NarSignature: Hashable, Sendable, CustomStringConvertible {
  public let keyName: String
  public let bytes: [UInt8]

  public init(keyName: String, bytes: [UInt8]) {
    self.keyName = keyName
    self.bytes = bytes
  }

  public init(parsing text: String) throws(KeyError) {
    let (name, data) = try splitKeyText(text, what: "signature", size: 64)
    self.init(keyName: name, bytes: data)
  }

  public var description: String { "\(keyName):\(Data(bytes).base64EncodedString())" }
}

public struct KeyError: Error, Hashable, Sendable, CustomStringConvertible {
  public let text: String
  public let reason: String
  public var description: String { "invalid \(reason)" }
}

func splitKeyText(_ text: String, what: String, size: Int) throws(KeyError) -> (String, [UInt8]) {
  guard let colon = text.firstIndex(of: ":"), colon != text.startIndex else {
    throw KeyError(text: text, reason: "\(what) '\(text)': expected name:base64")
  }
  let name = String(text[..<colon])
  guard let data = Data(base64Encoded: String(text[text.index(after: colon)...])), data.count == size else {
    throw KeyError(text: text, reason: "\(what) '\(name):…': expected \(size) bytes of base64")
  }
  return (name, Array(data))
}

/// An Ed25519 public key as Nix writes it: `name:base64(32 bytes)`.
public struct PublicKey: Hashable, Sendable, CustomStringConvertible {
  public let name: String
  public let raw: [UInt8]

  public init(parsing text: String) throws(KeyError) {
    let (name, raw) = try splitKeyText(text.trimmingCharacters(in: .whitespacesAndNewlines), what: "public key", size: 32)
    self.name = name
    self.raw = raw
  }

  init(name: String, raw: [UInt8]) {
    self.name = name
    self.raw = raw
  }

  public var description: String { "\(name):\(Data(raw).base64EncodedString())" }

  public func isValid(_ signature: NarSignature, for fingerprint: String) -> Bool {
    guard signature.keyName == name,
      let key = try? Curve25519.Signing.PublicKey(rawRepresentation: raw)
    else { return false }
    return key.isValidSignature(signature.bytes, for: Array(fingerprint.utf8))
  }
}

/// An Ed25519 secret key as `nix-store --generate-binary-cache-key` writes it:
/// `name:base64(seed ‖ public key)`.
public struct SecretKey: Sendable {
  public let name: String
  let key: Curve25519.Signing.PrivateKey

  public init(parsing text: String) throws(KeyError) {
    let (name, raw) = try splitKeyText(text.trimmingCharacters(in: .whitespacesAndNewlines), what: "secret key", size: 64)
    guard let key = try? Curve25519.Signing.PrivateKey(rawRepresentation: raw[0..<32]),
      Array(key.publicKey.rawRepresentation) == Array(raw[32..<64])
    else { throw KeyError(text: "", reason: "secret key '\(name)': seed and public half disagree") }
    self.name = name
    self.key = key
  }

  /// A fresh key pair (for tests and tooling).
  public init(generatingWithName name: String) {
    self.name = name
    self.key = Curve25519.Signing.PrivateKey()
  }

  public var publicKey: PublicKey { PublicKey(name: name, raw: Array(key.publicKey.rawRepresentation)) }

  /// The text form, as Nix writes it.
  public var serialized: String {
    "\(name):\(Data(key.rawRepresentation + key.publicKey.rawRepresentation).base64EncodedString())"
  }

  public func sign(_ fingerprint: String) -> NarSignature {
    // Ed25519 is deterministic in Nix (libsodium); swift-crypto's signatures are randomised but
    // verify the same way.
    let sig = (try? key.signature(for: Array(fingerprint.utf8))).map { Array($0) } ?? []
    return NarSignature(keyName: name, bytes: sig)
  }
}

/// The keys a node trusts (`trusted-public-keys`).
public struct TrustedKeys: Sendable {
  public let keys: [PublicKey]

  public init(_ keys: [PublicKey]) { self.keys = keys }

  public init(parsing texts: [String]) throws(KeyError) {
    var keys: [PublicKey] = []
    for t in texts { keys.append(try PublicKey(parsing: t)) }
    self.keys = keys
  }

  /// The name of the first trusted key with a valid signature among `signatures`, or nil.
  public func validSigner(of fingerprint: String, signatures: [NarSignature]) -> String? {
    for sig in signatures {
      for key in keys where key.name == sig.keyName && key.isValid(sig, for: fingerprint) {
        return key.name
      }
    }
    return nil
  }
}
