#!/usr/bin/env python3
"""A tiny HTTP image store for scripts/bench-boot.sh.

Serves the files of a store directory (manifests/, names/, chunks/, profiles/)
with plain GETs, sleeping a fixed delay per request (the store's latency: tc
here has no netem), and counts the bytes it serves. Control paths:
  GET /__stats            {"requests": N, "bytes": N, "chunk_requests": N, "chunk_bytes": N}
  GET /__reset            zero the counters
  GET /__profiles/on|off  serve or hide (404) profiles/*
Extra files outside the store: --file /URLPATH=LOCALPATH (e.g. the raw image).
"""

import argparse
import json
import os
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

LOCK = threading.Lock()
STATS = {"requests": 0, "bytes": 0, "chunk_requests": 0, "chunk_bytes": 0}
STATE = {"profiles": True}


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as a real store
    server_version = "bench-boot-store"

    def log_message(self, fmt, *args):
        pass

    def send_small(self, code, body, ctype="application/json"):
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def resolve(self, path):
        path = path.split("?", 1)[0]
        if path in self.server.extra:
            return self.server.extra[path]
        parts = [p for p in path.split("/") if p]
        if not parts or any(p in (".", "..") or "\x00" in p for p in parts):
            return None
        if parts[0] == "profiles" and not STATE["profiles"]:
            return None
        full = os.path.join(self.server.root, *parts)
        return full if os.path.isfile(full) else None

    def do_HEAD(self):
        self.do_GET()

    def do_GET(self):
        p = self.path.split("?", 1)[0]
        if p.startswith("/__"):
            if p == "/__stats":
                with LOCK:
                    body = json.dumps(STATS).encode()
            elif p == "/__reset":
                with LOCK:
                    for k in STATS:
                        STATS[k] = 0
                body = b"{}"
            elif p in ("/__profiles/on", "/__profiles/off"):
                STATE["profiles"] = p.endswith("/on")
                body = b"{}"
            else:
                return self.send_small(404, b"{}")
            return self.send_small(200, body)

        time.sleep(self.server.delay)
        full = self.resolve(p)
        if full is None:
            return self.send_small(404, b"not found\n", "text/plain")
        try:
            f = open(full, "rb")
        except OSError:
            return self.send_small(404, b"not found\n", "text/plain")
        with f:
            size = os.fstat(f.fileno()).st_size
            self.send_response(200)
            self.send_header("Content-Type", "application/octet-stream")
            self.send_header("Content-Length", str(size))
            self.end_headers()
            if self.command == "HEAD":
                return
            self.wfile.flush()
            sent = 0
            try:
                sent = self.connection.sendfile(f)
            finally:
                chunk = p.startswith("/chunks/")
                with LOCK:
                    STATS["requests"] += 1
                    STATS["bytes"] += sent
                    if chunk:
                        STATS["chunk_requests"] += 1
                        STATS["chunk_bytes"] += sent


class Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 128


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("root", help="the store directory")
    ap.add_argument("--listen", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=8080)
    ap.add_argument("--delay-ms", type=float, default=1.0, help="sleep per request (ms)")
    ap.add_argument("--file", action="append", default=[], metavar="/URLPATH=LOCALPATH")
    a = ap.parse_args()
    srv = Server((a.listen, a.port), Handler)
    srv.root = os.path.abspath(a.root)
    srv.delay = a.delay_ms / 1000.0
    srv.extra = {}
    for spec in a.file:
        url, _, local = spec.partition("=")
        srv.extra["/" + url.lstrip("/")] = os.path.abspath(local)
    srv.serve_forever()


if __name__ == "__main__":
    main()
