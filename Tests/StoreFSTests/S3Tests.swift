import Foundation
import NixFormats
import Testing
import TestSupport

/// `s3://` substituters as Nix spells them, against an S3-compatible server on loopback that
/// checks every request's SigV4 signature against the keys it issued.
@Suite(.serialized) struct S3SubstituterTests {
  let fx: StoreFixture
  init() throws { fx = try StoreFixture.shared() }

  /// Nothing of the machine's: no AWS variables, no ~/.aws.
  func environment(_ tmp: TemporaryDirectory, id: String = "", secret: String = "", file: String? = nil) -> [String: String] {
    [
      "AWS_ACCESS_KEY_ID": id, "AWS_SECRET_ACCESS_KEY": secret, "AWS_SESSION_TOKEN": "", "AWS_PROFILE": "",
      "AWS_SHARED_CREDENTIALS_FILE": file ?? tmp.sub("no-credentials-file"),
    ]
  }

  func fetch(_ tmp: TemporaryDirectory, _ state: String, _ url: String, _ path: StorePath, env: [String: String]) throws -> CommandResult {
    try run(
      [nixfsBinary, "fetch", "--state-dir", tmp.sub(state), "--substituter", url, "--trusted-public-key", fx.publicKey, path.path],
      environment: env, check: false)
  }

  @Test func signedRequestsFetchAPathByteForByte() throws {
    let tmp = try TemporaryDirectory("s3")
    let s3 = try S3Server(directory: fx.caches["xz"]!)
    let kinds = fx.paths["kinds"]!
    let expected = try NixFixture.dump(fx.trees[kinds]!)

    // Keys from the environment.
    let r = try fetch(tmp, "env", s3.url(), kinds, env: environment(tmp, id: s3.accessKeyID, secret: s3.secretAccessKey))
    #expect(r.status == 0, "\(r.stderr)")
    let nar = try run([nixfsBinary, "dump", "--state-dir", tmp.sub("env"), kinds.path]).stdout
    #expect(nar == expected, "the NAR from the bucket is the one Nix made")

    // Keys from a profile of the shared credentials file, named in the URL.
    let file = tmp.sub("credentials")
    try "[default]\naws_access_key_id = wrong\naws_secret_access_key = wrong\n\n[ci]\naws_access_key_id = \(s3.accessKeyID)\naws_secret_access_key = \(s3.secretAccessKey)\n"
      .write(toFile: file, atomically: true, encoding: .utf8)
    let p = try fetch(tmp, "profile", s3.url(extra: "&profile=ci"), kinds, env: environment(tmp, file: file))
    #expect(p.status == 0, "\(p.stderr)")
    #expect(try run([nixfsBinary, "dump", "--state-dir", tmp.sub("profile"), kinds.path]).stdout == expected)
  }

  @Test func badCredentialsAreSaidAsSuch() throws {
    let tmp = try TemporaryDirectory("s3-bad")
    let s3 = try S3Server(directory: fx.caches["zstd"]!)
    let kinds = fx.paths["kinds"]!
    // A wrong secret: S3 refuses the signature; the error says so, not "not found".
    let wrong = try fetch(tmp, "wrong", s3.url(), kinds, env: environment(tmp, id: s3.accessKeyID, secret: "not-the-secret"))
    #expect(wrong.status != 0)
    #expect(wrong.stderr.contains("S3 refused the credentials") && wrong.stderr.contains("SignatureDoesNotMatch"), "\(wrong.stderr)")
    #expect(!isStored(tmp, "wrong", kinds))
    // A profile the credentials file does not have: one line, before any request.
    let missing = try fetch(tmp, "missing", s3.url(extra: "&profile=nope"), kinds, env: environment(tmp))
    #expect(missing.status == 1)
    let lines = missing.stderr.split(separator: "\n").filter { $0.hasPrefix("nixfs: error:") }
    #expect(lines.count == 1 && lines[0].contains("S3 profile 'nope'"), "\(missing.stderr)")
    // A URL Nix would not accept either.
    let bad = try fetch(tmp, "bad", "s3://Not_A_Bucket?region=eu-west-1", kinds, env: environment(tmp))
    #expect(bad.status == 1 && bad.stderr.contains("is not an S3 bucket name"), "\(bad.stderr)")
  }

  func isStored(_ tmp: TemporaryDirectory, _ state: String, _ path: StorePath) -> Bool {
    (try? run([nixfsBinary, "dump", "--state-dir", tmp.sub(state), path.path], check: false).status) == 0
  }
}
