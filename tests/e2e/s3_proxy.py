"""An S3 endpoint on 127.0.0.1 that forwards to the loopback S3 server, for fault tests that need a run
stopped at a known point or a store failing in the middle of a folder, whatever the machine's speed."""

from __future__ import annotations

import http.client
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class FlakyS3Proxy:
    """Forwards every request to the loopback S3 server, except:
    - a PUT whose path ends with `fail_suffix` (while set) is refused with a 400, as a store failing in the
      middle of a folder would;
    - a request for which `hold(method, path)` (while set) is true waits, as a stalled store would: a run
      blocked at a known point until the test has done what it must do there. It goes on when the rule lets
      it go (asked again every 50 ms) or when `release` is set: then it is forwarded, or with `drop_held` its
      connection is closed unanswered (its writer was killed meanwhile; what it wrote must not land late).
    `held` counts the requests held; `passed` those let through, by (method, path without query)."""

    def __init__(self, upstream: str):
        self.upstream = upstream.removeprefix("http://")
        self.fail_suffix: str | None = None
        self.refused = 0
        self.hold: Callable[[str, str], bool] | None = None
        self.held = 0
        self.release = threading.Event()
        self.drop_held = False
        self.passed: Counter = Counter()
        self.lock = threading.RLock()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def body(self) -> bytes:
                if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                    out = b""
                    while True:
                        size = int(self.rfile.readline().split(b";")[0], 16)
                        chunk = self.rfile.read(size + 2)[:size]
                        if not size:
                            return out
                        out += chunk
                return self.rfile.read(int(self.headers.get("Content-Length") or 0))

            def forward(self):
                data = self.body()
                path = self.path.split("?")[0]
                if proxy.holds(self.command, path, first=True):
                    deadline = time.monotonic() + 300
                    while True:
                        if proxy.release.wait(0.05) or time.monotonic() > deadline:
                            if proxy.drop_held:
                                self.close_connection = True
                                return
                            proxy.let_through(self.command, path)
                            break
                        if not proxy.holds(self.command, path):
                            break
                if self.command == "PUT" and proxy.fail_suffix and path.endswith(proxy.fail_suffix):
                    proxy.refused += 1
                    message = (
                        b"<Error><Code>InvalidRequest</Code><Message>upload refused by the test proxy</Message></Error>"
                    )
                    self.send_response(400)
                    self.send_header("Content-Length", str(len(message)))
                    self.end_headers()
                    self.wfile.write(message)
                    return
                headers = {k: v for k, v in self.headers.items() if k.lower() not in ("transfer-encoding", "expect")}
                if self.command in ("PUT", "POST"):
                    headers["Content-Length"] = str(len(data))
                upstream = http.client.HTTPConnection(proxy.upstream, timeout=60)
                upstream.request(
                    self.command, self.path, body=data if self.command in ("PUT", "POST") else None, headers=headers
                )
                response = upstream.getresponse()
                payload = response.read()
                self.send_response(response.status)
                for k, v in response.getheaders():
                    if k.lower() not in ("transfer-encoding", "connection", "content-length"):
                        self.send_header(k, v)
                self.send_header(
                    "Content-Length",
                    str(len(payload)) if self.command != "HEAD" else response.getheader("Content-Length", "0"),
                )
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(payload)
                upstream.close()

            do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = forward

        class Server(ThreadingHTTPServer):
            daemon_threads = True

            def handle_error(self, request, client_address):
                # a client killed mid-request (what these tests do) resets its connection: no traceback for that
                if not isinstance(sys.exc_info()[1], ConnectionError):
                    super().handle_error(request, client_address)

        self.server = Server(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def holds(self, method: str, path: str, first: bool = False) -> bool:
        """Whether `hold` holds this request now (asked again while it waits, so a rule may let it go); if
        not, it is counted as let through in the same step, so that a rule counting those sees them all."""
        with self.lock:
            if self.hold is not None and self.hold(method, path):
                self.held += first
                return True
            self.passed[(method, path)] += 1
            return False

    def let_through(self, method: str, path: str) -> None:
        with self.lock:
            self.passed[(method, path)] += 1

    def count(self, method: str, contains: str) -> int:
        """How many `method` requests whose path holds `contains` were forwarded."""
        with self.lock:
            return sum(n for (m, p), n in self.passed.items() if m == method and contains in p)

    def close(self):
        self.drop_held = True  # a request still held belongs to a process the test is done with
        self.release.set()
        self.server.shutdown()
        self.server.server_close()
