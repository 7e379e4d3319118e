"""The last step of `make demo`: serve the model just trained, send it three requests as a client would
(one text, a list, a malformed body), print what comes back, and stop the server.

    python -m jobs.demo_endpoint CONFIG [k=v ...]     (the same config and overrides as `rayformers serve`)
"""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

REQUESTS = [
    ("one text", {"inputs": "the striker scored a late goal and the referee ended the match"}),
    (
        "a list",
        {"inputs": ["garlic pasta from the oven with a spicy soup", "our flight to the island left the hotel at dawn"]},
    ),
    ("a bad request (`input` for `inputs`)", {"input": "the chef baked a dessert"}),
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def post(url: str, body: dict) -> tuple[int, str]:
    request = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/healthz", timeout=5) as response:
            return response.status == 200
    except OSError:
        return False


def main(argv: list[str]) -> int:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    server = subprocess.Popen(
        [sys.executable, "-m", "jobs.cli", "serve", *argv, "serve.host=127.0.0.1", f"serve.port={port}"]
    )
    try:
        deadline = time.monotonic() + 240
        while not healthy(url):
            if server.poll() is not None:
                print(f"demo: `rayformers serve` ended with exit code {server.returncode}", file=sys.stderr)
                return 1
            if time.monotonic() > deadline:
                print("demo: the endpoint did not answer /healthz within 240 s", file=sys.stderr)
                return 1
            time.sleep(1)
        print(f"the endpoint is up: {url}/healthz answers; three requests as a client would send them", flush=True)
        for what, body in REQUESTS:
            status, answer = post(f"{url}/predict", body)
            print(f"\nPOST {url}/predict  {what}\n  {json.dumps(body)}\n  -> {status} {answer}", flush=True)
        return 0
    finally:
        server.send_signal(signal.SIGINT)  # `rayformers serve` stops Serve and its local Ray on Ctrl-C
        try:
            server.wait(90)
        except subprocess.TimeoutExpired:
            server.kill()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
