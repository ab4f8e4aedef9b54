import Foundation
import Testing
import TestSupport

// Offline checks of the Kubernetes deployment (deploy/): every rendered object validates strictly
// against the Kubernetes OpenAPI schemas (kubernetes-validate, PyPI), and the structure operators
// rely on (driver name, propagation, FUSE device, registration paths, overlay overrides) holds.
//
// Needs `kubectl` (for `kubectl kustomize`), `kubernetes-validate` and python3 with PyYAML.
// NIXFS_DEPLOY_DIR points the tests at another copy of deploy/ (to check that they fail).

/// A decoded Kubernetes object (or any JSON object).
typealias JSON = [String: Any]

enum Repo {
  /// The repository root: this file is Tests/DeployTests/DeployTests.swift.
  static let root: String = {
    var url = URL(fileURLWithPath: #filePath).resolvingSymlinksInPath()
    for _ in 0..<3 { url.deleteLastPathComponent() }
    return url.path
  }()

  static let deploy: String = ProcessInfo.processInfo.environment["NIXFS_DEPLOY_DIR"] ?? "\(root)/deploy"

  static func deploy(_ relative: String) -> String { "\(deploy)/\(relative)" }
}

/// Kubernetes versions whose strict schemas the manifests must satisfy: an older supported
/// release and the newest kubernetes-validate ships.
let kubernetesVersions = ["1.32.0", "1.37.0"]

let baseDriver = "csi.nixfs.dev"
let overlayDriver = "nix.csi.store"

// MARK: - Helpers

struct YAMLError: Error, CustomStringConvertible {
  let text: String
  var description: String { "not a YAML stream of objects: \(text.prefix(200))" }
}

/// Multi-document YAML to JSON objects (PyYAML; empty documents dropped).
func parseYAML(_ text: String) throws -> [JSON] {
  let script = """
    import sys, yaml, json
    print(json.dumps([d for d in yaml.safe_load_all(sys.stdin) if d is not None]))
    """
  let out = try run(["python3", "-c", script], stdin: Array(text.utf8))
  guard let objects = try JSONSerialization.jsonObject(with: Data(out.stdout)) as? [JSON] else {
    throw YAMLError(text: text)
  }
  return objects
}

struct Rendered {
  let directory: String
  let text: String
  let objects: [JSON]

  init(_ directory: String) throws {
    self.directory = directory
    text = try run(["kubectl", "kustomize", directory]).text
    objects = try parseYAML(text)
  }

  func all(_ kind: String) -> [JSON] { objects.filter { $0["kind"] as? String == kind } }

  func one(_ kind: String, sourceLocation: SourceLocation = #_sourceLocation) throws -> JSON {
    let matches = all(kind)
    try #require(matches.count == 1, "expected exactly one \(kind) in \(directory), found \(matches.count)",
      sourceLocation: sourceLocation)
    return matches[0]
  }

  /// The DaemonSets: `nixfs-node` (the CSI plugin) and `nixfs-mount` (the FUSE daemon and its keeper).
  func daemonSet(_ name: String = "nixfs-node", sourceLocation: SourceLocation = #_sourceLocation) throws -> JSON {
    let sets = all("DaemonSet")
    try #require(sets.count == 2, "expected the DaemonSets nixfs-node and nixfs-mount in \(directory)", sourceLocation: sourceLocation)
    return try #require(
      sets.first { dig($0, "metadata", "name") as? String == name }, "no DaemonSet \(name)", sourceLocation: sourceLocation)
  }

  func podSpec(_ name: String = "nixfs-node") throws -> JSON {
    try #require(dig(try daemonSet(name), "spec", "template", "spec") as? JSON)
  }

  func mountPodSpec() throws -> JSON { try podSpec("nixfs-mount") }
}

/// Walks nested objects and arrays: string keys for objects, Int indices for arrays.
func dig(_ value: Any?, _ path: Any...) -> Any? {
  var current = value
  for step in path {
    switch step {
    case let key as String: current = (current as? JSON)?[key]
    case let index as Int:
      guard let array = current as? [Any], array.indices.contains(index) else { return nil }
      current = array[index]
    default: return nil
    }
  }
  return current
}

/// A JSON value as sorted-key JSON text, to compare decoded values.
func canonical(_ value: Any?) throws -> String {
  guard let value else { return "null" }
  let data = try JSONSerialization.data(withJSONObject: value, options: [.sortedKeys, .fragmentsAllowed])
  return String(decoding: data, as: UTF8.self)
}

func strings(_ value: Any?) -> [String] { (value as? [Any])?.compactMap { $0 as? String } ?? [] }

func container(_ podSpec: JSON, _ name: String, sourceLocation: SourceLocation = #_sourceLocation) throws -> JSON {
  let containers = (podSpec["containers"] as? [JSON]) ?? []
  return try #require(
    containers.first { $0["name"] as? String == name }, "no container \(name)", sourceLocation: sourceLocation)
}

func volume(_ podSpec: JSON, _ name: String, sourceLocation: SourceLocation = #_sourceLocation) throws -> JSON {
  let volumes = (podSpec["volumes"] as? [JSON]) ?? []
  return try #require(
    volumes.first { $0["name"] as? String == name }, "no volume \(name)", sourceLocation: sourceLocation)
}

/// The volume mount of `container` at `path`, and the pod volume it mounts.
func mount(
  _ podSpec: JSON, _ container: JSON, at path: String, sourceLocation: SourceLocation = #_sourceLocation
) throws -> (mount: JSON, volume: JSON) {
  let mounts = (container["volumeMounts"] as? [JSON]) ?? []
  let m = try #require(
    mounts.first { $0["mountPath"] as? String == path },
    "container \(container["name"] ?? "?") mounts nothing at \(path)", sourceLocation: sourceLocation)
  let v = try volume(podSpec, try #require(m["name"] as? String), sourceLocation: sourceLocation)
  return (m, v)
}

/// The value following `flag` in an argv (`--flag value`), or of `--flag=value`.
func flagValue(_ argv: [String], _ flag: String) -> String? {
  if let i = argv.firstIndex(of: flag), i + 1 < argv.count { return argv[i + 1] }
  return argv.first { $0.hasPrefix("\(flag)=") }.map { String($0.dropFirst(flag.count + 1)) }
}

func argv(_ container: JSON) -> [String] { strings(container["command"]) + strings(container["args"]) }

struct Validation {
  let status: Int32
  let output: String
  /// "passed for resource kind/name" lines.
  var passed: Int { output.components(separatedBy: "\n").filter { $0.contains(" passed for resource ") }.count }
}

/// `kubernetes-validate --strict` on files: offline, against the schemas it ships.
func validate(_ files: [String], version: String) throws -> Validation {
  let r = try run(["kubernetes-validate", "--strict", "--kubernetes-version", version] + files, check: false)
  return Validation(status: r.status, output: r.text + r.stderr)
}

/// Nix32 store path: /nix/store/<32 chars of 0-9a-z minus e, o, u, t>-<name>.
func isStorePath(_ s: String) -> Bool {
  let prefix = "/nix/store/"
  guard s.hasPrefix(prefix) else { return false }
  let base = s.dropFirst(prefix.count)
  let alphabet = Set("0123456789abcdfghijklmnpqrsvwxyz")
  let hash = base.prefix(32)
  return hash.count == 32 && hash.allSatisfy { alphabet.contains($0) } && base.dropFirst(32).first == "-"
    && base.count > 33 && !base.contains("/")
}

/// Checks that one driver name is used consistently: CSIDriver, --driver-name, the plugin
/// directory (socket) and the registrar's kubelet-registration-path.
func expectDriver(_ r: Rendered, _ driver: String, sourceLocation: SourceLocation = #_sourceLocation) throws {
  let csiDriver = try r.one("CSIDriver", sourceLocation: sourceLocation)
  #expect(dig(csiDriver, "metadata", "name") as? String == driver, sourceLocation: sourceLocation)

  let pod = try r.podSpec()
  let csi = try container(pod, "nixfs-csi", sourceLocation: sourceLocation)
  #expect(flagValue(argv(csi), "--driver-name") == driver, sourceLocation: sourceLocation)

  let pluginDir = "/var/lib/kubelet/plugins/\(driver)"
  let endpoint = try #require(flagValue(argv(csi), "--endpoint"), sourceLocation: sourceLocation)
  #expect(endpoint == "unix:///csi/csi.sock", sourceLocation: sourceLocation)
  let csiSocketDir = try mount(pod, csi, at: "/csi", sourceLocation: sourceLocation)
  #expect(dig(csiSocketDir.volume, "hostPath", "path") as? String == pluginDir, sourceLocation: sourceLocation)
  #expect(dig(csiSocketDir.volume, "hostPath", "type") as? String == "DirectoryOrCreate", sourceLocation: sourceLocation)

  let registrar = try container(pod, "node-driver-registrar", sourceLocation: sourceLocation)
  #expect(flagValue(argv(registrar), "--csi-address") == "/csi/csi.sock", sourceLocation: sourceLocation)
  #expect(
    flagValue(argv(registrar), "--kubelet-registration-path") == "\(pluginDir)/csi.sock", sourceLocation: sourceLocation)
  // The registrar sees the plugin's socket through the same host directory.
  let registrarSocketDir = try mount(pod, registrar, at: "/csi", sourceLocation: sourceLocation)
  #expect(dig(registrarSocketDir.volume, "hostPath", "path") as? String == pluginDir, sourceLocation: sourceLocation)

  let probe = try container(pod, "liveness-probe", sourceLocation: sourceLocation)
  #expect(flagValue(argv(probe), "--csi-address") == "/csi/csi.sock", sourceLocation: sourceLocation)
  let probeSocketDir = try mount(pod, probe, at: "/csi", sourceLocation: sourceLocation)
  #expect(dig(probeSocketDir.volume, "hostPath", "path") as? String == pluginDir, sourceLocation: sourceLocation)
}

/// The image set by a kustomization's `images:` entry for `nixfs`.
func kustomizationImage(_ directory: String) throws -> String {
  let k = try #require(try parseYAML(try String(contentsOfFile: "\(directory)/kustomization.yaml", encoding: .utf8)).first)
  let images = (k["images"] as? [JSON]) ?? []
  let entry = try #require(images.first { $0["name"] as? String == "nixfs" }, "no images entry for nixfs in \(directory)")
  let name = try #require(entry["newName"] as? String)
  let tag = try #require(entry["newTag"] as? String)
  return "\(name):\(tag)"
}

// MARK: - Schema validation

/// Every kustomization under deploy/, relative to it.
let kustomizations = [
  "kubernetes", "kubernetes/base", "kubernetes/overlays/example", "kubernetes/overlays/cluster-cache",
  "kubernetes/overlays/cluster-cache-build",
]

@Suite("Kubernetes manifests validate strictly, offline")
struct SchemaValidationTests {
  @Test("rendered kustomization validates", arguments: kustomizations, kubernetesVersions)
  func renderedKustomizationValidates(directory: String, version: String) throws {
    let rendered = try Rendered(Repo.deploy(directory))
    let kinds = Set(rendered.objects.compactMap { $0["kind"] as? String })
    let node: Set = ["Namespace", "ServiceAccount", "ConfigMap", "DaemonSet", "CSIDriver"]
    #expect(kinds == (directory.contains("cluster-cache") ? node.union(["Service", "StatefulSet"]) : node))

    let tmp = try TemporaryDirectory("deploy")
    let file = tmp.sub("rendered.yaml")
    try rendered.text.write(toFile: file, atomically: true, encoding: .utf8)
    let v = try validate([file], version: version)
    #expect(v.status == 0, "\(v.output)")
    // Every object was checked, none skipped for want of a schema.
    #expect(v.passed == rendered.objects.count, "\(v.output)")
  }

  @Test("examples validate", arguments: kubernetesVersions)
  func examplesValidate(version: String) throws {
    let dir = Repo.deploy("examples")
    let files = try FileManager.default.contentsOfDirectory(atPath: dir).filter { $0.hasSuffix(".yaml") }.sorted()
    #expect(Set(files).isSuperset(of: ["pod.yaml", "pod-storepath.yaml", "job-flakeref.yaml"]))
    let paths = files.map { "\(dir)/\($0)" }
    let documents = try paths.reduce(0) { $0 + (try parseYAML(try String(contentsOfFile: $1, encoding: .utf8))).count }
    let v = try validate(paths, version: version)
    #expect(v.status == 0, "\(v.output)")
    #expect(v.passed == documents, "\(v.output)")
  }

  /// The negative control: strict validation really rejects what the API server would.
  @Test("strict validation rejects an unknown field and a wrong type")
  func strictValidationRejectsMistakes() throws {
    let rendered = try Rendered(Repo.deploy("kubernetes/base"))
    let tmp = try TemporaryDirectory("deploy")
    let mutate = """
      import sys, yaml
      docs = [d for d in yaml.safe_load_all(sys.stdin) if d is not None]
      for d in docs:
          if d["kind"] == "DaemonSet":
              d["spec"]["template"]["spec"]["nixfsBogusField"] = True
          if d["kind"] == "CSIDriver":
              d["spec"]["attachRequired"] = "no"
      print(yaml.safe_dump_all(docs))
      """
    let bad = try run(["python3", "-c", mutate], stdin: Array(rendered.text.utf8)).text
    let file = tmp.sub("bad.yaml")
    try bad.write(toFile: file, atomically: true, encoding: .utf8)
    let v = try validate([file], version: kubernetesVersions[0])
    #expect(v.status != 0)
    #expect(v.output.contains("nixfsBogusField"), "\(v.output)")
    #expect(v.output.contains("attachRequired"), "\(v.output)")
  }
}

// MARK: - Structure

@Suite("Kubernetes deployment structure")
struct DeploymentStructureTests {
  @Test("deploy/kubernetes installs exactly the base")
  func topLevelIsTheBase() throws {
    #expect(try Rendered(Repo.deploy("kubernetes")).text == (try Rendered(Repo.deploy("kubernetes/base")).text))
  }

  @Test("CSIDriver: inline ephemeral, no attach, pod info, no fsGroup changes")
  func csiDriver() throws {
    let driver = try Rendered(Repo.deploy("kubernetes")).one("CSIDriver")
    #expect(driver["apiVersion"] as? String == "storage.k8s.io/v1")
    #expect(dig(driver, "metadata", "name") as? String == baseDriver)
    #expect(dig(driver, "spec", "attachRequired") as? Bool == false)
    #expect(dig(driver, "spec", "podInfoOnMount") as? Bool == true)
    #expect(strings(dig(driver, "spec", "volumeLifecycleModes")) == ["Ephemeral"])
    #expect(dig(driver, "spec", "fsGroupPolicy") as? String == "None")
    #expect(dig(driver, "spec", "requiresRepublish") as? Bool == false)
  }

  @Test("namespace, labels and service account")
  func namespaceLabelsAccount() throws {
    let r = try Rendered(Repo.deploy("kubernetes"))
    let ns = try r.one("Namespace")
    #expect(dig(ns, "metadata", "name") as? String == "nixfs")
    #expect(dig(ns, "metadata", "labels", "pod-security.kubernetes.io/enforce") as? String == "privileged")
    for o in r.objects {
      let name = "\(o["kind"] ?? "?")/\(dig(o, "metadata", "name") ?? "?")"
      #expect(dig(o, "metadata", "labels", "app.kubernetes.io/name") as? String == "nixfs", "\(name)")
      if !["Namespace", "CSIDriver"].contains(o["kind"] as? String) {
        #expect(dig(o, "metadata", "namespace") as? String == "nixfs", "\(name)")
      }
    }
    let ds = try r.daemonSet()
    #expect(dig(ds, "metadata", "name") as? String == "nixfs-node")
    let selector = try #require(dig(ds, "spec", "selector", "matchLabels") as? [String: String])
    let podLabels = try #require(dig(ds, "spec", "template", "metadata", "labels") as? [String: String])
    #expect(selector["app.kubernetes.io/name"] == "nixfs")
    #expect(selector.allSatisfy { podLabels[$0.key] == $0.value })

    let account = try r.one("ServiceAccount")
    for pod in [try r.podSpec(), try r.mountPodSpec()] {
      #expect(pod["serviceAccountName"] as? String == dig(account, "metadata", "name") as? String)
      #expect(pod["automountServiceAccountToken"] as? Bool == false)
    }
    #expect(account["automountServiceAccountToken"] as? Bool == false)
    let mountSet = try r.daemonSet("nixfs-mount")
    let mountSelector = try #require(dig(mountSet, "spec", "selector", "matchLabels") as? [String: String])
    let mountLabels = try #require(dig(mountSet, "spec", "template", "metadata", "labels") as? [String: String])
    #expect(mountSelector.allSatisfy { mountLabels[$0.key] == $0.value })
    // Two DaemonSets, two disjoint selectors.
    #expect(mountSelector != selector)
    // No RBAC: the node plugin needs none.
    #expect(r.all("Role").isEmpty && r.all("ClusterRole").isEmpty && r.all("ClusterRoleBinding").isEmpty)
  }

  @Test("pods: every node, node-critical; the plugin rolls one node at a time, the mount surges")
  func podScheduling() throws {
    let r = try Rendered(Repo.deploy("kubernetes"))
    for name in ["nixfs-node", "nixfs-mount"] {
      let ds = try r.daemonSet(name)
      let pod = try r.podSpec(name)
      #expect(pod["priorityClassName"] as? String == "system-node-critical", "\(name)")
      let tolerations = try #require(pod["tolerations"] as? [JSON])
      #expect(tolerations.count == 1)
      #expect(tolerations.first?["operator"] as? String == "Exists")
      #expect(tolerations.first?["key"] == nil && tolerations.first?["effect"] == nil)
      #expect(pod["hostPID"] as? Bool == false)
      #expect(pod["hostNetwork"] as? Bool != true)
      #expect(pod["terminationGracePeriodSeconds"] as? Int == 30)
      #expect(dig(ds, "spec", "updateStrategy", "type") as? String == "RollingUpdate")
    }
    let ds = try r.daemonSet()
    #expect(dig(ds, "spec", "updateStrategy", "rollingUpdate", "maxUnavailable") as? Int == 1)
    let names = ((try r.podSpec()["containers"] as? [JSON]) ?? []).compactMap { $0["name"] as? String }
    #expect(names == ["nixfs-csi", "node-driver-registrar", "liveness-probe"])
    // The mount: the new pod beside the old, taking the mount over, before the old one goes.
    let mount = try r.daemonSet("nixfs-mount")
    #expect(dig(mount, "spec", "updateStrategy", "rollingUpdate", "maxSurge") as? Int == 1)
    #expect(dig(mount, "spec", "updateStrategy", "rollingUpdate", "maxUnavailable") as? Int == 0)
    let mountNames = ((try r.mountPodSpec()["containers"] as? [JSON]) ?? []).compactMap { $0["name"] as? String }
    #expect(mountNames == ["nixfs-mount", "nixfs-keeper"])
  }

  @Test("nixfs-keeper: unprivileged, shares its socket and the readiness file with nixfs-mount only")
  func keeperContainer() throws {
    let r = try Rendered(Repo.deploy("kubernetes"))
    let pod = try r.mountPodSpec()
    let keeper = try container(pod, "nixfs-keeper")
    let daemon = try container(pod, "nixfs-mount")
    let socket = try #require(flagValue(argv(keeper), "--socket"))
    #expect(strings(keeper["command"]).prefix(2) == ["nixfs", "keeper"])
    #expect(flagValue(argv(daemon), "--keeper") == socket)
    #expect(flagValue(argv(daemon), "--after-takeover") == "wait")
    let dir = (socket as NSString).deletingLastPathComponent
    let a = try mount(pod, keeper, at: dir)
    let b = try mount(pod, daemon, at: dir)
    #expect(a.volume["name"] as? String == b.volume["name"] as? String)
    #expect(a.volume["emptyDir"] != nil, "the socket must be this pod's own, not a hostPath both pods share")
    // Ready while this pod's daemon serves: the file in the pod's own directory.
    let ready = try #require(flagValue(argv(daemon), "--ready-file"))
    #expect((ready as NSString).deletingLastPathComponent == dir)
    #expect(strings(dig(daemon, "readinessProbe", "exec", "command")) == ["test", "-e", ready])
    #expect(dig(keeper, "securityContext", "privileged") as? Bool != true)
    #expect(dig(keeper, "securityContext", "runAsNonRoot") as? Bool == true)
    #expect(dig(keeper, "securityContext", "readOnlyRootFilesystem") as? Bool == true)
    #expect(dig(keeper, "securityContext", "allowPrivilegeEscalation") as? Bool == false)
    #expect(strings(dig(keeper, "securityContext", "capabilities", "drop")) == ["ALL"])
    #expect(dig(keeper, "resources", "limits", "memory") != nil)
    // The plugin's pod does not get the keeper's socket.
    #expect(!(try canonical(try r.podSpec())).contains(socket))
  }

  @Test("nixfs-mount: FUSE device, Bidirectional mount root, config, metrics, no CPU limit")
  func mountContainer() throws {
    let r = try Rendered(Repo.deploy("kubernetes"))
    let pod = try r.mountPodSpec()
    let c = try container(pod, "nixfs-mount")
    #expect(c["image"] as? String == (try kustomizationImage(Repo.deploy("kubernetes/base"))))
    let command = strings(c["command"])
    #expect(
      command == [
        "nixfs", "mount", "--state-dir", "/var/lib/nixfs", "--nix-conf", "/etc/nixfs/nix.conf",
        "--metrics-listen", "0.0.0.0:9464", "--max-size", "20G", "--keeper", "/run/nixfs-keeper/keeper.sock",
        "--after-takeover", "wait",
        "--ready-file", "/run/nixfs-keeper/serving", "/var/lib/nixfs/mnt",
      ])
    #expect(dig(c, "securityContext", "privileged") as? Bool == true)

    // The mount point lies inside the Bidirectional hostPath mount, so the FUSE mount reaches the host.
    let state = try mount(pod, c, at: "/var/lib/nixfs")
    #expect(state.mount["mountPropagation"] as? String == "Bidirectional")
    #expect(dig(state.volume, "hostPath", "path") as? String == "/var/lib/nixfs")
    #expect(dig(state.volume, "hostPath", "type") as? String == "DirectoryOrCreate")
    #expect(command.last?.hasPrefix("/var/lib/nixfs/") == true)
    #expect(flagValue(command, "--state-dir") == "/var/lib/nixfs")

    let fuse = try mount(pod, c, at: "/dev/fuse")
    #expect(dig(fuse.volume, "hostPath", "path") as? String == "/dev/fuse")
    #expect(dig(fuse.volume, "hostPath", "type") as? String == "CharDevice")

    // --nix-conf names a key of the generated ConfigMap, mounted at its directory.
    let nixConf = try #require(flagValue(command, "--nix-conf"))
    let config = try mount(pod, c, at: (nixConf as NSString).deletingLastPathComponent)
    let configMap = try r.one("ConfigMap")
    #expect(dig(config.volume, "configMap", "name") as? String == dig(configMap, "metadata", "name") as? String)
    let conf = try #require(dig(configMap, "data", (nixConf as NSString).lastPathComponent) as? String)
    let lines = conf.split(separator: "\n").map { $0.trimmingCharacters(in: .whitespaces) }
    #expect(lines.contains("substituters = https://cache.nixos.org"))
    #expect(
      lines.contains("trusted-public-keys = cache.nixos.org-1:6NCHdD59X431o0gWypbMrAURkbJ16ZPMQFGspcDShjY="))

    // The metrics port matches --metrics-listen.
    let ports = (c["ports"] as? [JSON]) ?? []
    let metrics = try #require(ports.first { $0["name"] as? String == "metrics" })
    #expect(metrics["containerPort"] as? Int == 9464)
    #expect(flagValue(command, "--metrics-listen")?.hasSuffix(":\(metrics["containerPort"] as? Int ?? -1)") == true)
    // A disk budget by default, where the docs' patch expects it.
    #expect(flagValue(command, "--max-size") == "20G")
    #expect(command.firstIndex(of: "--max-size") == 8, "Documentation/kubernetes.md patches command/9")

    #expect(dig(c, "resources", "requests", "cpu") != nil)
    #expect(dig(c, "resources", "requests", "memory") != nil)
    #expect(dig(c, "resources", "limits", "memory") != nil)
    #expect(dig(c, "resources", "limits", "cpu") == nil, "a CPU limit throttles every pod's I/O")
    // A liveness probe restarting the FUSE daemon would break every running pod's /nix.
    #expect(c["livenessProbe"] == nil)
  }

  @Test("nixfs-csi: driver, node ID, Bidirectional kubelet and state mounts, liveness")
  func csiContainer() throws {
    let r = try Rendered(Repo.deploy("kubernetes"))
    let pod = try r.podSpec()
    let c = try container(pod, "nixfs-csi")
    let mountContainer = try container(try r.mountPodSpec(), "nixfs-mount")
    #expect(c["image"] as? String == mountContainer["image"] as? String)
    #expect(
      strings(c["command"]) == [
        "nixfs", "csi", "--state-dir", "/var/lib/nixfs", "--endpoint", "unix:///csi/csi.sock",
        "--driver-name", baseDriver, "--metrics-listen", "0.0.0.0:9465",
      ])
    #expect(dig(c, "securityContext", "privileged") as? Bool == true)

    let env = (c["env"] as? [JSON]) ?? []
    let nodeName = try #require(env.first { $0["name"] as? String == "NODE_NAME" })
    #expect(dig(nodeName, "valueFrom", "fieldRef", "fieldPath") as? String == "spec.nodeName")

    let kubelet = try mount(pod, c, at: "/var/lib/kubelet")
    #expect(kubelet.mount["mountPropagation"] as? String == "Bidirectional")
    #expect(dig(kubelet.volume, "hostPath", "path") as? String == "/var/lib/kubelet")
    #expect(dig(kubelet.volume, "hostPath", "type") as? String == "Directory")

    // Same state directory as nixfs-mount (control socket, mount root), also Bidirectional.
    let state = try mount(pod, c, at: "/var/lib/nixfs")
    #expect(state.mount["mountPropagation"] as? String == "Bidirectional")
    #expect(dig(state.volume, "hostPath", "path") as? String == "/var/lib/nixfs")
    #expect(flagValue(argv(c), "--state-dir") == flagValue(argv(mountContainer), "--state-dir"))

    // Liveness: /healthz on the port the liveness-probe sidecar serves.
    #expect(dig(c, "livenessProbe", "httpGet", "path") as? String == "/healthz")
    let probePort = dig(c, "livenessProbe", "httpGet", "port")
    let ports = (c["ports"] as? [JSON]) ?? []
    let healthz = try #require(ports.first { $0["name"] as? String == "healthz" })
    #expect(healthz["containerPort"] as? Int == 9808)
    #expect(probePort as? String == "healthz" || probePort as? Int == 9808)
    let sidecar = try container(pod, "liveness-probe")
    #expect(flagValue(argv(sidecar), "--health-port") == "9808")

    #expect(dig(c, "resources", "requests", "memory") != nil)
    #expect(dig(c, "resources", "limits", "memory") != nil)
  }

  @Test("sidecars: pinned images, registration directory, resources")
  func sidecars() throws {
    let pod = try Rendered(Repo.deploy("kubernetes")).podSpec()
    let registrar = try container(pod, "node-driver-registrar")
    #expect(registrar["image"] as? String == "registry.k8s.io/sig-storage/csi-node-driver-registrar:v2.13.0")
    // The registrar's own health endpoint, probed; both sidecars unprivileged.
    #expect(flagValue(argv(registrar), "--http-endpoint") == ":9809")
    #expect(dig(registrar, "livenessProbe", "httpGet", "path") as? String == "/healthz")
    let regPorts = (registrar["ports"] as? [JSON]) ?? []
    #expect(regPorts.contains { $0["name"] as? String == "healthz-reg" && $0["containerPort"] as? Int == 9809 })
    for sidecar in [registrar, try container(pod, "liveness-probe")] {
      #expect(dig(sidecar, "securityContext", "allowPrivilegeEscalation") as? Bool == false)
      #expect(dig(sidecar, "securityContext", "readOnlyRootFilesystem") as? Bool == true)
      #expect((dig(sidecar, "securityContext", "capabilities", "drop") as? [String]) == ["ALL"])
      #expect(dig(sidecar, "securityContext", "privileged") == nil)
    }
    let registration = try mount(pod, registrar, at: "/registration")
    #expect(dig(registration.volume, "hostPath", "path") as? String == "/var/lib/kubelet/plugins_registry")
    #expect(dig(registration.volume, "hostPath", "type") as? String == "Directory")
    let probe = try container(pod, "liveness-probe")
    #expect(probe["image"] as? String == "registry.k8s.io/sig-storage/livenessprobe:v2.15.0")
    for c in [registrar, probe] {
      #expect(dig(c, "securityContext", "privileged") as? Bool != true, "\(c["name"] ?? "?")")
      #expect(dig(c, "resources", "requests") != nil && dig(c, "resources", "limits", "memory") != nil)
    }
  }

  @Test("base uses csi.nixfs.dev consistently")
  func baseDriverConsistent() throws {
    try expectDriver(try Rendered(Repo.deploy("kubernetes")), baseDriver)
  }
}

@Suite("Example overlay")
struct OverlayTests {
  static let overlay = "kubernetes/overlays/example"

  @Test("renames the driver to nix.csi.store everywhere")
  func renamesDriver() throws {
    let r = try Rendered(Repo.deploy(Self.overlay))
    try expectDriver(r, overlayDriver)
    #expect(!r.text.contains(baseDriver), "the overlay render still mentions \(baseDriver)")
  }

  @Test("sets the image it names on both nixfs containers, and only there")
  func setsImage() throws {
    let expected = try kustomizationImage(Repo.deploy(Self.overlay))
    #expect(expected != (try kustomizationImage(Repo.deploy("kubernetes/base"))))
    let rendered = try Rendered(Repo.deploy(Self.overlay))
    let pod = try rendered.podSpec()
    #expect(try container(rendered.mountPodSpec(), "nixfs-mount")["image"] as? String == expected)
    #expect(try container(rendered.mountPodSpec(), "nixfs-keeper")["image"] as? String == expected)
    #expect(try container(pod, "nixfs-csi")["image"] as? String == expected)
    #expect(
      try container(pod, "node-driver-registrar")["image"] as? String
        == "registry.k8s.io/sig-storage/csi-node-driver-registrar:v2.13.0")
  }

  @Test("replaces nix.conf with its own")
  func replacesNixConf() throws {
    let r = try Rendered(Repo.deploy(Self.overlay))
    let configMap = try r.one("ConfigMap")
    let own = try String(contentsOfFile: Repo.deploy("\(Self.overlay)/nix.conf"), encoding: .utf8)
    #expect(dig(configMap, "data", "nix.conf") as? String == own)
    #expect((dig(configMap, "data") as? JSON)?.count == 1)
    // The DaemonSet mounts the replaced ConfigMap (its hashed name changed with its content).
    let base = try Rendered(Repo.deploy("kubernetes")).one("ConfigMap")
    #expect(dig(configMap, "metadata", "name") as? String != dig(base, "metadata", "name") as? String)
    let pod = try r.mountPodSpec()
    #expect(dig(try volume(pod, "config"), "configMap", "name") as? String == dig(configMap, "metadata", "name") as? String)
  }

  @Test("keeps everything else of the base")
  func keepsTheRest() throws {
    let baseRender = try Rendered(Repo.deploy("kubernetes"))
    let overlayRender = try Rendered(Repo.deploy(Self.overlay))
    let base = try baseRender.podSpec()
    let overlay = try overlayRender.podSpec()
    for name in ["nixfs-mount", "nixfs-csi"] {
      let b = try container(name == "nixfs-mount" ? baseRender.mountPodSpec() : base, name)
      let o = try container(name == "nixfs-mount" ? overlayRender.mountPodSpec() : overlay, name)
      #expect(strings(b["command"]).count == strings(o["command"]).count, "\(name)")
      #expect(try canonical(b["volumeMounts"]) == (try canonical(o["volumeMounts"])), "\(name)")
    }
    #expect(overlay["priorityClassName"] as? String == "system-node-critical")
  }
}

@Suite("Builds at the cluster cache")
struct ClusterCacheBuildTests {
  /// The serve builds with a credential from a Secret; the nodes present it from a netrc.
  @Test("the build overlay turns --build on and gives both sides the credential")
  func buildOverlay() throws {
    let r = try Rendered(Repo.deploy("kubernetes/overlays/cluster-cache-build"))
    let serve = try #require(r.all("StatefulSet").first)
    let container = try #require((dig(serve, "spec", "template", "spec", "containers") as? [JSON])?.first)
    let command = strings(container["command"])
    #expect(command.contains("--build") && flagValue(command, "--build-credentials-file") == "/etc/nixfs-serve-build/credentials")
    #expect(flagValue(command, "--secret-key-file") != nil, "what the serve builds it signs")
    #expect((container["image"] as? String)?.hasPrefix("nixfs-build") == true, "the builder needs an image with Nix")
    let config = try #require(r.all("ConfigMap").first { (dig($0, "metadata", "name") as? String)?.hasPrefix("nixfs-config") == true })
    let conf = (config["data"] as? [String: String])?["nix.conf"] ?? ""
    #expect(conf.contains("netrc-file = /etc/nixfs-netrc/netrc"), "\(conf)")
    let mount = try r.daemonSet("nixfs-mount")
    let mountContainer = try #require((dig(mount, "spec", "template", "spec", "containers") as? [JSON])?.first { $0["name"] as? String == "nixfs-mount" })
    let mounts = (mountContainer["volumeMounts"] as? [JSON]) ?? []
    #expect(mounts.contains { $0["mountPath"] as? String == "/etc/nixfs-netrc" })
  }
}

@Suite("Example workloads")
struct ExampleTests {
  static func load(_ file: String) throws -> JSON {
    let docs = try parseYAML(try String(contentsOfFile: Repo.deploy("examples/\(file)"), encoding: .utf8))
    try #require(docs.count == 1)
    return docs[0]
  }

  static func podSpec(_ object: JSON) -> JSON? {
    (object["kind"] as? String == "Job" ? dig(object, "spec", "template", "spec") : object["spec"]) as? JSON
  }

  /// nix-csi style: the CSI volume at /nix, read-only, PATH through /nix/var/result/bin.
  static func expectNixCSIStyle(_ object: JSON) throws -> [String: String] {
    let pod = try #require(podSpec(object))
    let c = try #require((pod["containers"] as? [JSON])?.first)
    #expect(c["image"] as? String == "busybox:1.36")
    #expect(strings(c["command"]).first == "/nix/var/result/bin/hello")
    let env = (c["env"] as? [JSON]) ?? []
    #expect(env.first { $0["name"] as? String == "PATH" }?["value"] as? String == "/nix/var/result/bin:/bin")
    let nix = try mount(pod, c, at: "/nix")
    #expect(nix.mount["subPath"] == nil)
    #expect(dig(nix.volume, "csi", "driver") as? String == baseDriver)
    #expect(dig(nix.volume, "csi", "readOnly") as? Bool == true)
    return try #require(dig(nix.volume, "csi", "volumeAttributes") as? [String: String])
  }

  @Test("pod.yaml: per-system store paths")
  func perSystem() throws {
    let attributes = try Self.expectNixCSIStyle(try Self.load("pod.yaml"))
    #expect(Set(attributes.keys) == ["x86_64-linux", "aarch64-linux"])
    for (system, path) in attributes {
      #expect(isStorePath(path), "\(system): \(path)")
      #expect(path.contains("-hello-"), "\(system): \(path)")
    }
    #expect(attributes["x86_64-linux"] != attributes["aarch64-linux"])
  }

  @Test("pod-storepath.yaml: storePath")
  func storePath() throws {
    let attributes = try Self.expectNixCSIStyle(try Self.load("pod-storepath.yaml"))
    #expect(Array(attributes.keys) == ["storePath"])
    #expect(isStorePath(attributes["storePath"] ?? ""))
  }

  @Test("job-flakeref.yaml: flakeRef in a Job")
  func flakeRef() throws {
    let job = try Self.load("job-flakeref.yaml")
    #expect(job["kind"] as? String == "Job")
    let attributes = try Self.expectNixCSIStyle(job)
    #expect(Array(attributes.keys) == ["flakeRef"])
    #expect(attributes["flakeRef"]?.contains("#hello") == true)
  }

  @Test("job-nix-build.yaml: a read-write volume where nix-build runs")
  func readWrite() throws {
    let job = try Self.load("job-nix-build.yaml")
    let pod = try #require(Self.podSpec(job))
    let c = try #require((pod["containers"] as? [JSON])?.first)
    let nix = try mount(pod, c, at: "/nix")
    #expect(nix.mount["readOnly"] as? Bool != true, "a read-write volume is mounted writable")
    #expect(dig(nix.volume, "csi", "readOnly") as? Bool == false)
    let attributes = try #require(dig(nix.volume, "csi", "volumeAttributes") as? [String: String])
    #expect(isStorePath(attributes["x86_64-linux"] ?? ""))
    #expect(attributes["writableSize"] == "4Gi")
    #expect(strings(c["command"]).joined(separator: " ").contains("nix-build"))
  }

  @Test("the store-path checker rejects malformed paths")
  func storePathChecker() {
    #expect(isStorePath("/nix/store/a7hnr9dcmx3qkkn8a20g7md1wya5zc9l-hello-2.12.2"))
    #expect(!isStorePath("/nix/store/e7hnr9dcmx3qkkn8a20g7md1wya5zc9l-hello"))  // 'e' is not Nix32
    #expect(!isStorePath("/nix/store/a7hnr9dcmx3qkkn8a20g7md1wya5zc9-hello"))  // 31 characters
    #expect(!isStorePath("/nix/store/a7hnr9dcmx3qkkn8a20g7md1wya5zc9l-hello/bin"))
  }
}

@Suite("Container image recipe")
struct ContainerfileTests {
  static func text() throws -> String { try String(contentsOfFile: Repo.deploy("Containerfile"), encoding: .utf8) }

  /// The build stages: the lines from each FROM to the next (continuation lines joined,
  /// comments dropped).
  static func stages() throws -> [String] {
    let joined = try text().replacingOccurrences(of: "\\\n", with: " ")
    var stages: [String] = []
    for line in joined.split(separator: "\n") where !line.hasPrefix("#") {
      if line.hasPrefix("FROM ") { stages.append("") }
      if !stages.isEmpty { stages[stages.count - 1] += String(line) + "\n" }
    }
    return stages
  }

  @Test("builder installs every -dev package Package.swift's system libraries name")
  func builderHasEveryDevPackage() throws {
    let stages = try Self.stages()
    try #require(stages.count == 2)
    #expect(try Self.text().contains("ARG SWIFT_IMAGE=docker.io/library/swift:6."))
    #expect(stages[0].hasPrefix("FROM ${SWIFT_IMAGE}"))
    #expect(stages[0].contains("--static-swift-stdlib") && stages[0].contains("--product nixfs"))
    #expect(stages[0].contains("strip /out/nixfs"), "the image's binary is stripped")
    let manifest = try String(contentsOfFile: "\(Repo.root)/Package.swift", encoding: .utf8)
    // .apt(["libfuse3-dev", "fuse3"]) → libfuse3-dev, fuse3
    let apt = try NSRegularExpression(pattern: #"\.apt\(\[([^\]]*)\]\)"#)
    var packages: Set<String> = []
    for m in apt.matches(in: manifest, range: NSRange(manifest.startIndex..., in: manifest)) {
      let list = String(manifest[Range(m.range(at: 1), in: manifest)!])
      for p in list.split(separator: ",") {
        packages.insert(p.trimmingCharacters(in: CharacterSet(charactersIn: " \"")))
      }
    }
    let dev = packages.filter { $0.hasSuffix("-dev") }
    #expect(!dev.isEmpty)
    for p in dev.sorted() { #expect(stages[0].contains(" \(p)"), "builder stage lacks \(p)") }
    #expect(stages[0].contains(" pkg-config"))
  }

  @Test("runtime stage: slim Debian, shared libraries, nixfs on PATH as entrypoint")
  func runtimeStage() throws {
    let runtime = try Self.stages()[1]
    #expect(try Self.text().contains("debian:bookworm-slim"))
    for p in ["fuse3", "libfuse3-3", "libcurl4", "libzstd1", "liblzma5", "libbz2-1.0", "libsqlite3-0", "ca-certificates"] {
      #expect(runtime.contains(" \(p)"), "runtime stage lacks \(p)")
    }
    #expect(runtime.contains("--no-install-recommends"))
    #expect(runtime.contains("rm -rf /var/lib/apt/lists/*"))
    #expect(runtime.contains("/usr/local/bin/nixfs"))
    #expect(runtime.contains(#"ENTRYPOINT ["nixfs"]"#))
    // The DaemonSet runs `nixfs ...` through PATH.
    let pod = try Rendered(Repo.deploy("kubernetes")).mountPodSpec()
    #expect(strings(try container(pod, "nixfs-mount")["command"]).first == "nixfs")
  }
}

@Suite("The cluster cache component")
struct ClusterCacheTests {
  @Test("nodes ask the serve first, then upstream; only the serve holds the signing key")
  func nodesAskTheServeFirst() throws {
    let rendered = try Rendered(Repo.deploy("kubernetes/overlays/cluster-cache"))
    let configs = rendered.all("ConfigMap")
    let node = try #require(configs.first { ($0["metadata"] as? JSON)?["name"].map { "\($0)" }?.hasPrefix("nixfs-config") == true })
    let conf = try #require((node["data"] as? JSON)?["nix.conf"] as? String)
    let subs = try #require(conf.split(separator: "\n").first { $0.hasPrefix("substituters") })
    let urls = subs.split(separator: "=", maxSplits: 1)[1].split(separator: " ").map(String.init)
    #expect(urls == ["http://nixfs-serve.nixfs.svc.cluster.local", "https://cache.nixos.org"])
    let sts = try rendered.one("StatefulSet")
    let spec = try #require(dig(sts, "spec", "template", "spec") as? JSON)
    let serve = try container(spec, "nixfs-serve")
    let args = argv(serve)
    #expect(flagValue(args, "--secret-key-file") == "/etc/nixfs-serve-key/secret")
    #expect(dig(spec, "volumes") .map { "\($0)" }?.contains("nixfs-serve-key") == true)
    #expect(dig(serve, "securityContext", "readOnlyRootFilesystem") as? Bool == true)
    #expect((dig(sts, "spec", "volumeClaimTemplates") as? [Any])?.count == 1)
    // The node pods never see the key.
    for ds in [try rendered.podSpec(), try rendered.mountPodSpec()] {
      #expect(!(try canonical(ds)).contains("nixfs-serve-key"))
    }
    let services = rendered.all("Service").compactMap { dig($0, "spec", "clusterIP") as? String }
    #expect(services.contains("None"))
  }
}

/// The monitoring component: a Service in front of the mount daemons' metrics ports, a
/// ServiceMonitor scraping it, and alerts on metrics the daemon exports.
@Suite("The monitoring component")
struct MonitoringComponentTests {
  @Test("ServiceMonitor finds the daemons' metrics; alerts use series the daemon has")
  func monitoringFitsTheDaemonSet() throws {
    let r = try Rendered(Repo.deploy("kubernetes/overlays/monitoring"))
    let service = try #require(r.all("Service").first { dig($0, "metadata", "name") as? String == "nixfs-mount-metrics" })
    let mount = try r.daemonSet("nixfs-mount")
    // The Service selects the mount pods (by every label its selector names) on their metrics port.
    let podLabels = (dig(mount, "spec", "template", "metadata", "labels") as? [String: String]) ?? [:]
    let selector = (dig(service, "spec", "selector") as? [String: String]) ?? [:]
    #expect(!selector.isEmpty && selector.allSatisfy { podLabels[$0.key] == $0.value }, "\(selector) vs \(podLabels)")
    let ports = (dig(service, "spec", "ports") as? [JSON]) ?? []
    #expect(ports.first?["targetPort"] as? String == "metrics")
    let containerPorts = try container(try r.mountPodSpec(), "nixfs-mount")["ports"] as? [JSON] ?? []
    #expect(containerPorts.contains { $0["name"] as? String == "metrics" })
    // The ServiceMonitor selects that Service, in its namespace, on that port.
    let monitor = try #require(r.all("ServiceMonitor").first { dig($0, "metadata", "name") as? String == "nixfs-mount" })
    let wanted = (dig(monitor, "spec", "selector", "matchLabels") as? [String: String]) ?? [:]
    let serviceLabels = (dig(service, "metadata", "labels") as? [String: String]) ?? [:]
    #expect(!wanted.isEmpty && wanted.allSatisfy { serviceLabels[$0.key] == $0.value })
    #expect(dig(monitor, "metadata", "namespace") as? String == dig(service, "metadata", "namespace") as? String)
    #expect(((dig(monitor, "spec", "endpoints") as? [JSON])?.first?["port"] as? String) == "metrics")
    // The same for the CSI plugins' metrics, on the node DaemonSet's csi-metrics port.
    let csiService = try #require(r.all("Service").first { dig($0, "metadata", "name") as? String == "nixfs-csi-metrics" })
    let nodeLabels = (dig(try r.daemonSet("nixfs-node"), "spec", "template", "metadata", "labels") as? [String: String]) ?? [:]
    let csiSelector = (dig(csiService, "spec", "selector") as? [String: String]) ?? [:]
    #expect(!csiSelector.isEmpty && csiSelector.allSatisfy { nodeLabels[$0.key] == $0.value }, "\(csiSelector) vs \(nodeLabels)")
    let csiContainer = try container(try #require(dig(try r.daemonSet("nixfs-node"), "spec", "template", "spec") as? JSON), "nixfs-csi")
    #expect((csiContainer["ports"] as? [JSON] ?? []).contains { $0["name"] as? String == "csi-metrics" && $0["containerPort"] as? Int == 9465 })
    #expect((csiContainer["command"] as? [String] ?? []).contains("0.0.0.0:9465"))
    let csiMonitor = try #require(r.all("ServiceMonitor").first { dig($0, "metadata", "name") as? String == "nixfs-csi" })
    let csiWanted = (dig(csiMonitor, "spec", "selector", "matchLabels") as? [String: String]) ?? [:]
    let csiServiceLabels = (dig(csiService, "metadata", "labels") as? [String: String]) ?? [:]
    #expect(!csiWanted.isEmpty && csiWanted.allSatisfy { csiServiceLabels[$0.key] == $0.value })
    #expect(((dig(csiMonitor, "spec", "endpoints") as? [JSON])?.first?["port"] as? String) == "csi-metrics")
    // Every series an alert uses is one the daemon or the plugin exports, and the `up` alert
    // names the Service.
    let metricsSource = try ["StoreFS/Metrics.swift", "CSINode/Metrics.swift", "BinaryCache/Metrics.swift"].map {
      try String(contentsOfFile: "\(Repo.root)/Sources/\($0)", encoding: .utf8)
    }.joined()
    let rule = try r.one("PrometheusRule")
    let rules = ((dig(rule, "spec", "groups") as? [JSON]) ?? []).flatMap { ($0["rules"] as? [JSON]) ?? [] }
    #expect(rules.count >= 4)
    let series = try NSRegularExpression(pattern: #"nixfs_[a-z_]+"#)
    for rule in rules {
      let expr = rule["expr"] as? String ?? ""
      for m in series.matches(in: expr, range: NSRange(expr.startIndex..., in: expr)) {
        var name = String(expr[Range(m.range, in: expr)!])
        for suffix in ["_bucket", "_count", "_sum"] where name.hasSuffix(suffix) { name = String(name.dropLast(suffix.count)) }
        #expect(metricsSource.contains("\"\(name)\""), "alert \(rule["alert"] ?? "?") uses \(name), which the daemon does not export")
      }
      #expect(rule["alert"] != nil && dig(rule, "annotations", "summary") != nil)
    }
    #expect(rules.contains { ($0["expr"] as? String)?.contains("up{service=\"\(dig(service, "metadata", "name") as? String ?? "")\"}") == true })
    // The standard objects still validate strictly (the operator's kinds have no schema here).
    let standard = r.objects.filter { ($0["apiVersion"] as? String)?.hasPrefix("monitoring.coreos.com") != true }
    let tmp = try TemporaryDirectory("monitoring")
    let file = tmp.sub("standard.yaml")
    let yaml = try run(
      ["python3", "-c", "import sys, json, yaml; print(yaml.safe_dump_all(json.load(sys.stdin)))"],
      stdin: Array(try JSONSerialization.data(withJSONObject: standard)))
    try yaml.text.write(toFile: file, atomically: true, encoding: .utf8)
    let v = try validate([file], version: kubernetesVersions[0])
    #expect(v.status == 0 && v.passed == standard.count, "\(v.output)")
  }
}
