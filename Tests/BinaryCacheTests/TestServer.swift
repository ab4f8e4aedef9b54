import Foundation
import TestSupport

/// A real HTTP/1.1 server on 127.0.0.1 serving a directory (a binary cache made by `nix copy`),
/// with faults injected per path. Python's http.server does the HTTP; the script is kept here so
/// the test target has no loose resource files. The process is stopped when the value is released
/// (and exits by itself if the test process dies).
final class TestServer: @unchecked Sendable {
  enum ServerError: Error { case noPort(status: Int32) }

  struct Fault: Encodable {
    /// Answer with this HTTP status.
    var status: Int? = nil
    /// Send this many body bytes, then cut the connection.
    var cut: Int? = nil
    /// Send this many body bytes, then go silent (for 300 s, then close).
    var stall: Int? = nil
    /// Flip the byte at this offset of the file.
    var corrupt: Int? = nil
    /// Serve only this many bytes (with a matching Content-Length).
    var truncate: Int? = nil
    /// Send the body at this many bytes per second (logged as a STALL when it starts).
    var trickle: Double? = nil
    /// After the body, send padding without end and without a Content-Length: "zstd" (skippable
    /// frames) or "xz" (stream padding). Logs SENT with the byte count when the client hangs up.
    var endless: String? = nil
    /// Answer 302 with this Location.
    var redirect: String? = nil
    /// Apply to the first `times` requests only (nil: every request).
    var times: Int? = nil
  }

  struct Config: Encodable {
    var latency: Double = 0
    var range = true
    var faults: [String: [Fault]] = [:]
  }

  let port: Int
  let dir: String
  private let process: Process
  private let logFile: String
  private let eventFile: String
  private let configFile: String
  private let tmp: TemporaryDirectory

  var url: String { "http://127.0.0.1:\(port)" }

  init(serving dir: String, config: Config = Config()) throws {
    self.dir = dir
    tmp = try TemporaryDirectory("server")
    let script = tmp.sub("server.py")
    try Self.script.write(toFile: script, atomically: true, encoding: .utf8)
    logFile = tmp.sub("requests.log")
    eventFile = tmp.sub("events.log")
    configFile = tmp.sub("config.json")
    _ = FileManager.default.createFile(atPath: logFile, contents: nil)
    process = Process()
    try Self.write(config, to: configFile)
    process.executableURL = URL(fileURLWithPath: "/usr/bin/env")
    process.arguments = ["python3", script, dir, configFile, logFile, eventFile]
    let out = Pipe()
    process.standardOutput = out
    process.standardError = FileHandle.standardError
    try process.run()
    // The first line on stdout is the port it bound (port 0: the kernel picked a free one).
    var line = Data()
    while !line.contains(UInt8(ascii: "\n")) {
      let piece = out.fileHandleForReading.availableData
      if piece.isEmpty { break }
      line.append(piece)
    }
    guard let p = Int(String(decoding: line, as: UTF8.self).trimmingCharacters(in: .whitespacesAndNewlines)) else {
      kill(process.processIdentifier, SIGKILL)
      process.waitUntilExit()
      throw ServerError.noPort(status: process.terminationStatus)
    }
    port = p
  }

  /// Changes the faults of a running server.
  func configure(_ config: Config) throws { try Self.write(config, to: configFile) }

  private static func write(_ config: Config, to file: String) throws {
    let data = try JSONEncoder().encode(config)
    let temp = file + ".new"
    try data.write(to: URL(fileURLWithPath: temp))
    _ = rename(temp, file)
  }

  /// Requests served so far, as "GET /path range" lines.
  var requests: [String] {
    ((try? String(contentsOfFile: logFile, encoding: .utf8)) ?? "").split(separator: "\n").map(String.init)
  }

  func requests(for path: String) -> [String] { requests.filter { $0.split(separator: " ")[1] == path } }

  /// What the server saw of a stalled response to `path`, read from its own log. Tests judge
  /// timeouts and cancellation by these: the server's clock is not slowed when the test process's
  /// threads are busy with other tests.
  struct Stall {
    /// When it went silent (seconds since 1970).
    var began: Double
    /// When the client hung up, if it has.
    var hungUp: Double?
    /// Body bytes an endless response sent before the client hung up.
    var sent: Int? = nil
  }

  /// The latest stall of `path`, with the hang-up of that same connection (events carry the
  /// client's port, so a retry's connection is not confused with an earlier one).
  func stall(of path: String) -> Stall? {
    var found: (port: Substring, stall: Stall)? = nil
    var text = (try? String(contentsOfFile: eventFile, encoding: .utf8)) ?? ""
    // A line still being written is not read.
    if let end = text.lastIndex(of: "\n") { text = String(text[...end]) } else { text = "" }
    for line in text.split(separator: "\n") {
      let f = line.split(separator: " ")
      guard f.count == 4, f[1] == path, let t = Double(f[3]) else { continue }
      if f[0] == "STALL" { found = (f[2], Stall(began: t)) }
      if f[0] == "SENT", found?.port == f[2] { found?.stall.sent = Int(f[3]) }
      if f[0] == "HANGUP", found?.port == f[2] { found?.stall.hungUp = t }
    }
    return found?.stall
  }

  /// Waits until `ready` holds for the stall of `path`, and returns that stall. The wait runs
  /// nearly as long as the server's own 300 s stall: it only ends early when something is broken,
  /// and this test's clock may stand still for a minute while other tests hold its threads.
  func waitForStall(of path: String, seconds: Double = 290, until ready: (Stall) -> Bool = { _ in true }) async -> Stall? {
    let deadline = Date().addingTimeInterval(seconds)
    while !Task.isCancelled {
      // Read after taking the time: a test suspended past the deadline still sees what happened.
      let late = Date() > deadline
      if let s = stall(of: path), ready(s) { return s }
      if late { return nil }
      try? await Task.sleep(nanoseconds: 20_000_000)
    }
    return nil
  }

  func stop() {
    if process.isRunning {
      // SIGKILL: the test process may run with SIGTERM blocked, and children inherit the mask.
      kill(process.processIdentifier, SIGKILL)
      process.waitUntilExit()
    }
  }

  deinit { stop() }

  static let script = #"""
    import http.server, json, os, select, signal, socket, sys, threading, time

    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM, signal.SIGINT})

    root, config_file, log_file, event_file = sys.argv[1:5]
    parent = os.getppid()
    counts = {}
    lock = threading.Lock()

    def event(kind, path, port, value=None):
        with lock, open(event_file, "a") as f:
            f.write("%s %s %d %s\n" % (kind, path, port, "%.3f" % time.time() if value is None else value))

    def watchdog():
        # Never outlive the test process.
        while True:
            if os.getppid() != parent:
                os._exit(0)
            time.sleep(0.5)

    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args):
            pass

        def fault(self, config):
            rules = config.get("faults", {}).get(self.path.split("?")[0], [])
            with lock:
                for i, rule in enumerate(rules):
                    key = (self.path, i)
                    n = counts.get(key, 0)
                    times = rule.get("times")
                    if times is None or n < times:
                        counts[key] = n + 1
                        return rule
            return {}

        def do_GET(self):
            with open(config_file) as f:
                config = json.load(f)
            with open(log_file, "a") as f:
                f.write("GET %s %s\n" % (self.path, self.headers.get("Range", "-")))
            if config.get("latency"):
                time.sleep(config["latency"])
            rule = self.fault(config)
            if rule.get("redirect"):
                self.send_response(302)
                self.send_header("Location", rule["redirect"])
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            if rule.get("status"):
                body = b"injected failure\n"
                self.send_response(rule["status"])
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)
                return
            path = os.path.join(root, self.path.split("?")[0].lstrip("/"))
            if not os.path.isfile(path):
                body = b"not found\n"
                self.send_response(404)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)
                return
            with open(path, "rb") as f:
                data = bytearray(f.read())
            if rule.get("corrupt") is not None and rule["corrupt"] < len(data):
                data[rule["corrupt"]] ^= 0xFF
            if rule.get("truncate") is not None:
                data = data[: rule["truncate"]]
            total = len(data)
            start = 0
            rng = self.headers.get("Range")
            if rng and config.get("range", True) and rng.startswith("bytes=") and rng.endswith("-"):
                start = int(rng[6:-1])
                self.send_response(206)
                self.send_header("Content-Range", "bytes %d-%d/%d" % (start, total - 1, total))
            else:
                self.send_response(200)
                if config.get("range", True):
                    self.send_header("Accept-Ranges", "bytes")
            body = bytes(data[start:])
            if rule.get("endless"):
                # No Content-Length: the body ends when the connection does, which it never does.
                self.end_headers()
                event("STALL", self.path, self.client_address[1])
                if rule["endless"] == "zstd":
                    pad = (0x184D2A50).to_bytes(4, "little") + (65536).to_bytes(4, "little") + bytes(65536)
                else:
                    pad = bytes(65536)
                sent = 0
                began = time.monotonic()
                try:
                    self.wfile.write(body)
                    sent = len(body)
                    while time.monotonic() - began < 300:
                        self.wfile.write(pad)
                        sent += len(pad)
                except OSError:
                    pass
                event("HANGUP", self.path, self.client_address[1])
                event("SENT", self.path, self.client_address[1], sent)
                self.close_connection = True
                return
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if rule.get("trickle"):
                event("STALL", self.path, self.client_address[1])
                began = time.monotonic()
                try:
                    for i in range(len(body)):
                        if time.monotonic() - began > 300:
                            break
                        self.wfile.write(body[i:i + 1])
                        self.wfile.flush()
                        time.sleep(1 / rule["trickle"])
                except OSError:
                    pass
                event("HANGUP", self.path, self.client_address[1])
                self.close_connection = True
                return
            if rule.get("cut") is not None:
                self.wfile.write(body[: rule["cut"]])
                self.wfile.flush()
                self.connection.shutdown(socket.SHUT_RDWR)
                self.close_connection = True
                return
            if rule.get("stall") is not None:
                self.wfile.write(body[: rule["stall"]])
                self.wfile.flush()
                event("STALL", self.path, self.client_address[1])
                began = time.monotonic()
                while time.monotonic() - began < 300:
                    readable, _, _ = select.select([self.connection], [], [], 0.1)
                    if not readable:
                        continue
                    try:
                        gone = not self.connection.recv(1, socket.MSG_PEEK)
                    except OSError:
                        gone = True
                    if gone:
                        event("HANGUP", self.path, self.client_address[1])
                        break
                    time.sleep(0.1)
                self.close_connection = True
                return
            self.wfile.write(body)

    class Server(http.server.ThreadingHTTPServer):
        daemon_threads = True
        request_queue_size = 128

        def handle_error(self, request, client_address):
            pass  # clients that hang up (on purpose, in these tests) are not news

    threading.Thread(target=watchdog, daemon=True).start()
    server = Server(("127.0.0.1", 0), Handler)
    print(server.server_address[1], flush=True)
    server.serve_forever()
    """#
}
