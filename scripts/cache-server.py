#!/usr/bin/env python3
"""A static Nix binary cache server for tests, the demo and the benchmark harness.

Serves DIR over HTTP/1.1 on 127.0.0.1 and prints "PORT <n>" once listening. It can simulate
distance (latency per request, a bandwidth cap), count what crosses the wire, and inject faults on
paths matching a pattern: stall (send headers, then nothing), 500 errors, a corrupted byte, a body
cut to half its length. With --upstream it is a proxy in front of another cache (a broken CDN edge
or disk in front of a good serve), passing status, Range and the headers a cache sends through.
Stops on SIGTERM/SIGINT or when --max-seconds runs out.
"""
import argparse, http.server, json, os, re, signal, socketserver, sys, threading, time
import urllib.error, urllib.request

p = argparse.ArgumentParser()
p.add_argument("--dir", default=".")
p.add_argument("--port", type=int, default=0)
p.add_argument("--latency-ms", type=float, default=0, help="added before each response")
p.add_argument("--bandwidth", type=float, default=0, help="bytes/s cap per response, 0 = none")
p.add_argument("--log", help="append one JSON line per request")
p.add_argument("--stall", help="regex of paths that stall after the headers")
p.add_argument("--fail", help="regex of paths answered 500")
p.add_argument("--corrupt", help="regex of paths whose body has its middle byte flipped")
p.add_argument("--truncate", help="regex of paths whose body is cut to half (with a matching Content-Length)")
p.add_argument("--upstream", help="proxy every request to this base URL instead of serving --dir")
p.add_argument("--max-seconds", type=float, default=3600)
args = p.parse_args()

lock = threading.Lock()
log = open(args.log, "a", buffering=1) if args.log else None
root = os.path.realpath(args.dir)


class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *a):
        pass

    def record(self, status, sent, event="done"):
        if log:
            with lock:
                log.write(json.dumps({"path": self.path, "status": status, "bytes": sent, "t": time.time(), "event": event}) + "\n")

    def do_HEAD(self):
        self.do_GET(head=True)

    def do_GET(self, head=False):
        if args.latency_ms:
            time.sleep(args.latency_ms / 1000)
        if args.fail and re.search(args.fail, self.path):
            return self.send_simple(500, b"injected failure\n")
        if args.upstream:
            return self.proxy(head)
        path = os.path.realpath(os.path.join(root, self.path.split("?")[0].lstrip("/")))
        if not path.startswith(root) or not os.path.isfile(path):
            return self.send_simple(404, b"not found\n")
        with open(path, "rb") as f:
            data = self.damaged(f.read())
        start, status = 0, 200
        rng = self.headers.get("Range")
        m = re.match(r"bytes=(\d+)-$", rng or "")
        if m and int(m.group(1)) < len(data):
            start, status = int(m.group(1)), 206
        self.send_response(status)
        self.send_header("Content-Length", str(len(data) - start))
        if status == 206:
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        self.send_header("Accept-Ranges", "bytes")
        self.end_headers()
        self.send_body(head, status, data, start)

    def damaged(self, data):
        if args.corrupt and re.search(args.corrupt, self.path) and data:
            data = bytearray(data)
            data[len(data) // 2] ^= 0x5A
            data = bytes(data)
        if args.truncate and re.search(args.truncate, self.path):
            data = data[: len(data) // 2]
        return data

    def do_POST(self):
        # Only as a proxy (a serve's chunk batches, build requests); faults apply to the answer.
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        if args.fail and re.search(args.fail, self.path):
            return self.send_simple(500, b"injected failure\n")
        if not args.upstream:
            return self.send_simple(405, b"POST only as a proxy\n")
        return self.proxy(False, body)

    def proxy(self, head, body=None):
        headers = {"Range": self.headers["Range"]} if self.headers.get("Range") else {}
        if body is not None:
            headers["Content-Type"] = self.headers.get("Content-Type") or "application/octet-stream"
        method = "POST" if body is not None else ("HEAD" if head else "GET")
        request = urllib.request.Request(args.upstream + self.path, data=body, headers=headers, method=method)
        try:
            with urllib.request.urlopen(request, timeout=120) as r:
                status, got, data = r.status, r.headers, r.read()
        except urllib.error.HTTPError as e:
            status, got, data = e.code, e.headers, e.read()
        except OSError as e:
            return self.send_simple(502, f"upstream: {e}\n".encode())
        data = self.damaged(data)
        self.send_response(status)
        for name in ("Content-Type", "Content-Range", "Accept-Ranges", "X-Nixfs-Encoding", "Cache-Control", "ETag"):
            if got.get(name):
                self.send_header(name, got[name])
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.send_body(head, status, data, 0)

    def send_body(self, head, status, data, start):
        if head:
            return self.record(status, 0)
        self.record(status, 0, event="start")  # a body under way: tests wait for this
        if args.stall and re.search(args.stall, self.path):
            stalled = data[start:start + min(100, len(data) - start)]
            self.wfile.write(stalled)
            self.wfile.flush()
            self.record(status, len(stalled))  # logged when it goes silent: tests wait for this

            time.sleep(args.max_seconds)
            return
        sent, body, piece = 0, data[start:], 65536
        t0 = time.time()
        try:
            while sent < len(body):
                chunk = body[sent:sent + piece]
                self.wfile.write(chunk)
                sent += len(chunk)
                if args.bandwidth:
                    ahead = sent / args.bandwidth - (time.time() - t0)
                    if ahead > 0:
                        time.sleep(ahead)
        except (BrokenPipeError, ConnectionResetError):
            pass
        self.record(status, sent)

    def send_simple(self, status, body):
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
        self.record(status, len(body))


class Server(socketserver.ThreadingMixIn, http.server.HTTPServer):
    daemon_threads = True
    allow_reuse_address = True


server = Server(("127.0.0.1", args.port), Handler)
# A parent may have blocked these (test runners do); we must still stop when told.
signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM, signal.SIGINT})
signal.signal(signal.SIGTERM, lambda *a: os._exit(0))
signal.signal(signal.SIGINT, lambda *a: os._exit(0))
threading.Timer(args.max_seconds, lambda: os._exit(0)).start()
print(f"PORT {server.server_address[1]}", flush=True)
server.serve_forever()
