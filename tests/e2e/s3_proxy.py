"""An S3 endpoint on 127.0.0.1 that forwards to the loopback S3 server, for fault tests that need a run
stopped at a known point or a store failing in the middle of a folder, whatever the machine's speed."""

from __future__ import annotations

import http.client
import threading
from collections import Counter
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class FlakyS3Proxy:
    """Forwards every request to the loopback S3 server, except:
    - a PUT whose path ends with `fail_suffix` (while set) is refused with a 400, as a store failing in the
      middle of a folder would;
    - a request for which `hold(method, path)` (while set) is true waits for `release`, as a stalled store
      would: a run blocked at a known point until the test has done what it must do there. Released, it is
      forwarded, or with `drop_held` its connection is closed unanswered (the writer was killed meanwhile,
      and what it was writing must not land late).
    `held` counts the requests held; `passed` those let through at once, by (method, path without query)."""

    def __init__(self, upstream: str):
        self.upstream = upstream.removeprefix("http://")
        self.fail_suffix: str | None = None
        self.refused = 0
        self.hold: Callable[[str, str], bool] | None = None
        self.held = 0
        self.release = threading.Event()
        self.drop_held = False
        self.passed: Counter = Counter()
        self.lock = threading.Lock()
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
                with proxy.lock:  # one decision at a time: a rule that counts passed requests sees them all
                    hold = proxy.hold is not None and proxy.hold(self.command, path)
                    if hold:
                        proxy.held += 1
                    else:
                        proxy.passed[(self.command, path)] += 1
                if hold:
                    proxy.release.wait(300)
                    if proxy.drop_held:
                        self.close_connection = True
                        return
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

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def count(self, method: str, contains: str) -> int:
        """How many `method` requests whose path holds `contains` were forwarded."""
        with self.lock:
            return sum(n for (m, p), n in self.passed.items() if m == method and contains in p)

    def close(self):
        self.drop_held = True  # a request still held belongs to a process the test is done with
        self.release.set()
        self.server.shutdown()
        self.server.server_close()
