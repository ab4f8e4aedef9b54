import Foundation
import GRPCCore
import NixFormats
import NodeControl
import SwiftProtobuf

/// CSI Identity: who we are, and whether the mount daemon behind us answers.
public struct IdentityService: Csi_V1_Identity.SimpleServiceProtocol {
  let config: CSIConfiguration
  let control: ControlClient

  public init(config: CSIConfiguration) {
    self.config = config
    self.control = ControlClient(path: config.controlSocket)
  }

  public func getPluginInfo(request: Csi_V1_GetPluginInfoRequest, context: ServerContext) async throws
    -> Csi_V1_GetPluginInfoResponse
  {
    var r = Csi_V1_GetPluginInfoResponse()
    r.name = config.driverName
    r.vendorVersion = NixFSVersion.string
    return r
  }

  public func getPluginCapabilities(request: Csi_V1_GetPluginCapabilitiesRequest, context: ServerContext) async throws
    -> Csi_V1_GetPluginCapabilitiesResponse
  {
    // No controller service: volumes are ephemeral and node-local.
    Csi_V1_GetPluginCapabilitiesResponse()
  }

  public func probe(request: Csi_V1_ProbeRequest, context: ServerContext) async throws -> Csi_V1_ProbeResponse {
    var r = Csi_V1_ProbeResponse()
    let answer = try? await control.request(.ping, timeout: 5)
    r.ready = Google_Protobuf_BoolValue(answer?.mountpoint != nil)
    return r
  }
}
