/// The nixfs release, reported in `--version`, the User-Agent and the CSI plugin info.
public enum NixFSVersion {
  public static let string = "0.1.0"
}
