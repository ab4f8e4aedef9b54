import Foundation
import NixFormats
import NodeControl

#if canImport(Glibc)
  import Glibc
#endif

public struct CSIConfiguration: Sendable {
  public var driverName: String
  public var nodeID: String
  public var stateDir: String
  /// The Nix system of this node (`x86_64-linux`): which volume attribute names the store path.
  public var system: String
  /// A `nix` binary to evaluate `flakeRef` / `nixExpr` attributes; nil disables them.
  public var nixBinary: String?
  /// How long one `nix eval` of a flakeRef or nixExpr attribute may take.
  public var evaluationTimeout: Double = 120
  public var storeDir: String = StorePath.defaultStoreDir

  public init(driverName: String, nodeID: String, stateDir: String, system: String, nixBinary: String?) {
    self.driverName = driverName
    self.nodeID = nodeID
    self.stateDir = stateDir
    self.system = system
    self.nixBinary = nixBinary
  }

  public static let defaultDriverName = "csi.nixfs.dev"

  /// `x86_64-linux`, `aarch64-linux`, … from uname.
  public static func detectSystem() -> String {
    var u = utsname()
    uname(&u)
    let machine = withUnsafeBytes(of: &u.machine) { String(decoding: $0.prefix { $0 != 0 }, as: UTF8.self) }
    switch machine {
    case "arm64": return "aarch64-linux"
    case "i686", "i586", "i386": return "i686-linux"
    default: return "\(machine)-linux"
    }
  }

  var controlSocket: String { ControlSocket.path(stateDir: stateDir) }
}
