import BuildInfo

/// The nixfs release, reported in `--version`, the User-Agent and the CSI plugin info.
public enum NixFSVersion {
  public static let string = "0.1.0"
  /// The git commit built (`-dirty` with uncommitted changes), or "unknown" outside a checkout.
  public static let commit = buildCommit
  /// `0.1.0 (commit 0123456789ab)`, for `--version` and `nixfs status`.
  public static var description: String { "\(string) (commit \(commit))" }
}
