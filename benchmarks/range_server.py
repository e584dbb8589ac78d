"""A loopback HTTP file server with Range requests, byte counts and deliberate connection drops.

Used by tests/test_shards.py and benchmarks/bench_data.py to serve tar shards on 127.0.0.1 the way an object
store's HTTP endpoint does: HEAD for sizes, GET with `Range: bytes=a-b` answered 206 with only those bytes.
`drop_first` makes the first N GETs close the connection after half their body (a transient failure a reader
must retry); `drop_all` makes every GET do that.
"""

from __future__ import annotations

import os
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

_RANGE = re.compile(r"bytes=(\d*)-(\d*)$")


class RangeServer:
    """Serves the files of `root` on 127.0.0.1 (a free port) in a background thread; `url(name)` addresses one."""

    def __init__(self, root: str, drop_first: int = 0, drop_all: bool = False) -> None:
        self.root, self.drop_first, self.drop_all = root, drop_first, drop_all
        self.bytes_served, self.gets, self.dropped = 0, 0, 0
        self._lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:  # quiet: tests and benchmarks print their own summary
                pass

            def _file(self) -> str | None:
                path = os.path.join(server.root, self.path.split("?", 1)[0].lstrip("/"))
                if not os.path.isfile(path):
                    self.send_response(404)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return None
                return path

            def do_HEAD(self) -> None:
                path = self._file()
                if path is None:
                    return
                self.send_response(200)
                self.send_header("Content-Length", str(os.path.getsize(path)))
                self.send_header("Accept-Ranges", "bytes")
                self.end_headers()

            def do_GET(self) -> None:
                path = self._file()
                if path is None:
                    return
                size = os.path.getsize(path)
                start, end = 0, size - 1
                m = _RANGE.match(self.headers.get("Range", ""))
                if m:
                    if m.group(1):
                        start = int(m.group(1))
                        end = min(int(m.group(2)), size - 1) if m.group(2) else size - 1
                    else:  # suffix range: the last N bytes
                        start = max(0, size - int(m.group(2)))
                with open(path, "rb") as f:
                    f.seek(start)
                    body = f.read(end - start + 1)
                with server._lock:
                    server.gets += 1
                    drop = server.drop_all or server.gets <= server.drop_first
                    server.dropped += drop
                self.send_response(206 if m else 200)
                self.send_header("Content-Length", str(len(body)))
                self.send_header("Accept-Ranges", "bytes")
                if m:
                    self.send_header("Content-Range", f"bytes {start}-{end}/{size}")
                self.end_headers()
                sent = body[:len(body) // 2] if drop else body
                self.wfile.write(sent)
                with server._lock:
                    server.bytes_served += len(sent)
                if drop:  # a connection lost mid-body
                    self.close_connection = True
                    self.wfile.flush()
                    self.connection.shutdown(2)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.port = self.httpd.server_address[1]
        self._thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def url(self, name: str) -> str:
        """The http:// URL of file `name` under the root."""
        return f"http://127.0.0.1:{self.port}/{name}"

    def __enter__(self) -> RangeServer:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
