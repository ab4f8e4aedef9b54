import Foundation
import Testing
import TestSupport

/// The mount daemon's metrics endpoint: Prometheus text, a health path, IPv4 and IPv6, and a
/// client that connects and says nothing does not hold up a scrape.
@Suite(.serialized) struct MetricsEndpointTests {
  let fx: StoreFixture
  init() throws { fx = try StoreFixture.shared() }

  /// (status, body) of a GET with a 10 s timeout, while another client holds an idle connection.
  func get(_ url: String, holdingIdle: (host: String, port: Int)? = nil) throws -> (Int, String) {
    let script = """
      import socket, sys, urllib.request
      if len(sys.argv) > 2:
          idle = socket.create_connection((sys.argv[2], int(sys.argv[3])))  # connects, says nothing
      r = urllib.request.urlopen(sys.argv[1], timeout=10)
      print(r.status); sys.stdout.write(r.read().decode())
      """
    let extra = holdingIdle.map { [$0.host, String($0.port)] } ?? []
    let out = try run(["python3", "-c", script, url] + extra).text
    let nl = out.firstIndex(of: "\n") ?? out.endIndex
    return (Int(out[..<nl]) ?? -1, nl < out.endIndex ? String(out[out.index(after: nl)...]) : "")
  }

  @Test func metricsHealthAndBothAddressFamilies() throws {
    let tmp = try TemporaryDirectory("metrics")
    let server = try CacheServer(directory: fx.caches["zstd"]!)
    let port = try freePort()
    let node = try MountedStore(
      mountpoint: tmp.sub("mnt"), stateDir: tmp.sub("state"),
      arguments: fx.mountArguments(server, extra: ["--metrics-listen", "[::]:\(port)", "--max-size", "1G"]))
    defer { node.stop() }
    #expect(FileManager.default.contents(atPath: node.path("\(fx.paths["kinds"]!.baseName)/hello.txt")) != nil)
    let (status, body) = try get("http://127.0.0.1:\(port)/metrics", holdingIdle: ("127.0.0.1", port))
    #expect(status == 200)
    #expect(body.contains("nixfs_fuse_requests_total"), "\(body.prefix(500))")
    #expect(body.contains("nixfs_store_path_resolutions_total"))
    // Gauges read from the daemon at the scrape: the store against its budget, the build.
    #expect(body.contains("nixfs_store_budget_bytes 1073741824"), "\(body)")
    #expect(body.contains("nixfs_build_info{version=\"") && body.contains("commit=\""), "\(body)")
    // Help for every series, units at the end of names, fetch times up to 300 s.
    for name in ["nixfs_served_bytes_total", "nixfs_fuse_requests_total", "nixfs_fetch_duration_seconds", "nixfs_substituter_requests_total", "nixfs_store_bytes"] {
      #expect(body.contains("# HELP \(name) "), "no help for \(name)")
    }
    let types = body.split(separator: "\n").filter { $0.hasPrefix("# TYPE ") }.map { $0.split(separator: " ")[2] }
    let helped = Set(body.split(separator: "\n").filter { $0.hasPrefix("# HELP ") }.map { $0.split(separator: " ")[2] })
    #expect(types.allSatisfy { helped.contains($0) }, "series without # HELP: \(types.filter { !helped.contains($0) })")
    #expect(body.contains("nixfs_fetch_duration_seconds_bucket{le=\"300.0\"}"), "\(body)")
    // Requests and bytes per substituter, as configured; every series there before it is used.
    let sub = "substituter=\"\(server.url)\""
    let narinfos = body.split(separator: "\n").first { $0.hasPrefix("nixfs_substituter_requests_total{\(sub),kind=\"narinfo\",outcome=\"ok\"}") }
    #expect((narinfos.flatMap { Double($0.split(separator: " ").last!) } ?? 0) >= 1, "\(body)")
    #expect(body.contains("nixfs_substituter_received_bytes_total{\(sub),kind=\"nar\"}"))
    #expect(body.contains("nixfs_substituter_requests_total{\(sub),kind=\"chunk\",outcome=\"error\"} 0"))
    #expect(body.contains("nixfs_chunks_rejected_total 0"))
    #expect(body.contains("nixfs_pinned_paths ") && body.contains("nixfs_partial_paths 0"))
    let stored = body.split(separator: "\n").first { $0.hasPrefix("nixfs_store_bytes ") }.flatMap { Double($0.split(separator: " ")[1]) }
    #expect((stored ?? 0) > 0, "the store holds the path just read")
    #expect(try get("http://[::1]:\(port)/healthz") == (200, "ok\n"))
    // Any other path answers the metrics too, as scrapers configured for `/` expect.
    #expect(try get("http://127.0.0.1:\(port)/").1.contains("nixfs_fuse_requests_total"))
  }

  /// 100 scrapes at once, while one client dribbles its request a byte at a time: every scrape
  /// is answered in full, and so is the slow client.
  @Test func manyScrapesAndASlowClient() throws {
    let tmp = try TemporaryDirectory("metrics-load")
    let server = try CacheServer(directory: fx.caches["zstd"]!)
    let port = try freePort()
    let node = try MountedStore(
      mountpoint: tmp.sub("mnt"), stateDir: tmp.sub("state"),
      arguments: fx.mountArguments(server, extra: ["--metrics-listen", "127.0.0.1:\(port)"]))
    defer { node.stop() }
    let script = """
      import socket, sys, threading, time, urllib.request
      port = int(sys.argv[1])
      slow = socket.create_connection(("127.0.0.1", port))
      def dribble():
          for b in b"GET /metrics HTTP/1.1\\r\\nHost: x\\r\\nConnection: close\\r\\n\\r\\n":
              slow.send(bytes([b])); time.sleep(0.04)
      d = threading.Thread(target=dribble); d.start()
      ok = []
      def scrape():
          try:
              r = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30)
              ok.append(r.status == 200 and b"nixfs_fuse_requests_total" in r.read())
          except Exception as e:
              print("scrape failed:", e, file=sys.stderr)
      threads = [threading.Thread(target=scrape) for _ in range(100)]
      for t in threads: t.start()
      for t in threads: t.join()
      d.join()
      slow.settimeout(30)
      reply = b""
      while True:
          piece = slow.recv(65536)
          if not piece: break
          reply += piece
      print(sum(ok), reply.split(b"\\r\\n")[0].decode(), b"nixfs_fuse_requests_total" in reply)
      """
    let out = try run(["python3", "-c", script, String(port)]).trimmed
    #expect(out == "100 HTTP/1.1 200 OK True", "\(out)")
  }

  @Test func aBadOrBusyAddressIsOneLine() throws {
    let tmp = try TemporaryDirectory("metrics-bad")
    let server = try CacheServer(directory: fx.caches["zstd"]!)
    for (address, says) in [("nonsense", "expected HOST:PORT"), ("127.0.0.1:\(server.port)", "cannot serve metrics on")] {
      let r = try run(
        [nixfsBinary, "mount", "--state-dir", tmp.sub("state")] + fx.mountArguments(server, extra: ["--metrics-listen", address])
          + [tmp.sub("mnt")], check: false)
      #expect(r.status == 1)
      let lines = r.stderr.split(separator: "\n").filter { $0.hasPrefix("nixfs: error:") }
      #expect(lines.count == 1 && lines[0].contains(says), "\(r.stderr)")
      #expect(!isFuseMount(tmp.sub("mnt")))
    }
  }
}

/// Running under systemd (`Type=notify`) and feeding a log collector.
@Suite(.serialized) struct HostIntegrationTests {
  let fx: StoreFixture
  init() throws { fx = try StoreFixture.shared() }

  @Test func readinessReachesSystemdAndLogsCanBeJSON() throws {
    let tmp = try TemporaryDirectory("notify")
    let server = try CacheServer(directory: fx.caches["zstd"]!)
    let socket = tmp.sub("notify.sock")
    // systemd's side: a datagram socket that prints what it gets, a message a line.
    let listener = try BackgroundProcess([
      "python3", "-u", "-c",
      """
      import socket, sys
      s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM); s.bind(sys.argv[1]); print("bound", flush=True)
      while True: print(s.recv(4096).decode().replace("\\n", " "), flush=True)
      """,
      socket,
    ])
    defer { listener.stop() }
    #expect(listener.readLine() == "bound")
    try Tree.directory(tmp.sub("mnt"))
    let daemon = try BackgroundProcess(
      [nixfsBinary, "mount", "--state-dir", tmp.sub("state"), "--log-format", "json"] + fx.mountArguments(server)
        + [tmp.sub("mnt")], environment: ["NOTIFY_SOCKET": socket])
    defer {
      daemon.stop()
      _ = try? run(["fusermount3", "-u", "-z", tmp.sub("mnt")], check: false)
    }
    let ready = listener.readLine() ?? ""
    #expect(ready.contains("READY=1") && ready.contains("MAINPID=\(daemon.pid)"), "\(ready)")
    #expect(isFuseMount(tmp.sub("mnt")), "ready only once mounted")
    daemon.stop()
    #expect(listener.readLine()?.contains("STOPPING=1") == true)
    // Every log line is one JSON object with the fields collectors key on.
    let lines = daemon.stderr.split(separator: "\n")
    #expect(!lines.isEmpty)
    for line in lines {
      let object = try JSONSerialization.jsonObject(with: Data(line.utf8)) as? [String: Any]
      #expect(object?["time"] is String && object?["level"] is String && object?["message"] is String, "\(line)")
    }
    #expect(lines.contains { $0.contains("\"message\":\"nixfs mount starting\"") && $0.contains("\"substituters\"") })
  }
}

/// `nixfs status`: what the running daemon runs with, where each setting came from, what it holds.
@Suite(.serialized) struct StatusTests {
  let fx: StoreFixture
  init() throws { fx = try StoreFixture.shared() }

  @Test func statusReportsSettingsWithTheirSourcesAndTheStore() throws {
    let tmp = try TemporaryDirectory("status")
    let server = try CacheServer(directory: fx.caches["zstd"]!)
    try "substituters = \(server.url) http://127.0.0.1:9\nnarinfo-cache-negative-ttl = 7\n".write(
      toFile: tmp.sub("nix.conf"), atomically: true, encoding: .utf8)
    let node = try MountedStore(
      mountpoint: tmp.sub("mnt"), stateDir: tmp.sub("state"),
      arguments: ["--nix-conf", tmp.sub("nix.conf"), "--trusted-public-key", fx.publicKey, "--max-size", "1G"])
    defer { node.stop() }
    #expect(FileManager.default.contents(atPath: node.path("\(fx.paths["kinds"]!.baseName)/hello.txt")) != nil)
    let out = try run([nixfsBinary, "status", "--state-dir", tmp.sub("state"), "--json"]).stdout
    let status = try #require(try JSONSerialization.jsonObject(with: Data(out)) as? [String: Any])
    let settings = Dictionary(
      uniqueKeysWithValues: ((status["settings"] as? [[String: String]]) ?? []).map { ($0["name"] ?? "", $0) })
    #expect(settings["substituters"]?["source"]?.hasPrefix("nix.conf") == true, "\(settings)")
    #expect(settings["trusted-public-keys"]?["source"] == "flag")
    #expect(settings["trusted-public-keys"]?["value"] == "fs-test-1")
    #expect(settings["narinfo-cache-negative-ttl"]?["value"] == "7.0")
    #expect(settings["require-sigs"]?["source"] == "default")
    #expect(settings["max-size"]?["value"] == "1G")
    #expect(status["budgetBytes"] as? Int == 1 << 30)
    #expect((status["paths"] as? Int ?? 0) >= 1)
    #expect((status["substituters"] as? [[String: Any]])?.first?["url"] as? String == server.url)
    #expect((status["unreachable"] as? [String]) == ["http://127.0.0.1:9"])
    // The text form says the same in lines a person reads.
    let text = try run([nixfsBinary, "status", "--state-dir", tmp.sub("state")]).text
    #expect(text.contains("serving \(tmp.sub("mnt"))") && text.contains("(not answering)"), "\(text)")
    // No daemon: one line saying so.
    let none = try run([nixfsBinary, "status", "--state-dir", tmp.sub("nothing")], check: false)
    #expect(none.status == 1 && none.stderr.contains("no nixfs mount daemon answers"))
  }
}

/// `nixfs fetch` shows progress as `nix copy` does on a terminal, and stays quiet in logs.
@Suite(.serialized) struct FetchProgressTests {
  let fx: StoreFixture
  init() throws { fx = try StoreFixture.shared() }

  @Test func progressOnATerminalOnly() throws {
    let tmp = try TemporaryDirectory("progress")
    let server = try CacheServer(directory: fx.caches["zstd"]!)
    let app = fx.paths["app"]!
    func fetch(_ state: String, extra: [String] = []) -> [String] {
      [nixfsBinary, "fetch", "--state-dir", tmp.sub(state)] + fx.mountArguments(server) + extra + [app.path]
    }
    // A terminal: `script` gives the command a pseudo-terminal and copies what it writes.
    let shell = fetch("tty").map { "'\($0)'" }.joined(separator: " ")
    let onTTY = try run(["script", "-qefc", shell, "/dev/null"]).text
    #expect(onTTY.contains("[3/3 paths,"), "\(onTTY)")
    #expect(onTTY.contains("fetched \(app.path)"), "\(onTTY)")
    #expect(onTTY.contains("3 paths in the closure, 3 fetched"))
    // Not a terminal (a log): the summary only.
    let piped = try run(fetch("pipe"))
    #expect(!piped.stderr.contains("paths,") && !piped.stderr.contains("fetched /nix"), "\(piped.stderr)")
    #expect(piped.text.contains("3 paths in the closure, 3 fetched"))
    // --quiet on a terminal: the summary only.
    let quiet = try run(["script", "-qefc", fetch("quiet", extra: ["--quiet"]).map { "'\($0)'" }.joined(separator: " "), "/dev/null"]).text
    #expect(!quiet.contains("paths,") && quiet.contains("3 paths in the closure, 3 fetched"), "\(quiet)")
  }
}
