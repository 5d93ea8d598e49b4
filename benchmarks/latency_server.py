"""tests/openai_server.py with a fixed latency, in its own process (so the server takes no CPU or GIL from the client).

    python benchmarks/latency_server.py --latency 0.1

Every call is answered after `latency` seconds with the six-step rationale to the request's gold label (no
faults), keeping connections alive. Prints `URL <base_url>` once listening; stops when stdin closes.
"""

from __future__ import annotations

import argparse
import http.server
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from openai_server import OpenAIServer, gold_answer  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--latency", type=float, required=True)
    args = p.parse_args()

    def slow_answer(body: dict, key: str) -> str:
        time.sleep(args.latency)
        return gold_answer(body, key)

    # As a real server (vLLM, a hosted API) does: a listen backlog for every client connection (the stdlib's 5 resets
    # the 6th concurrent connect) and HTTP/1.1 keep-alive (the test server's replies carry Content-Length).
    http.server.ThreadingHTTPServer.request_queue_size = 1024
    http.server.BaseHTTPRequestHandler.protocol_version = "HTTP/1.1"
    # TCP_NODELAY, as uvicorn and every serving stack set it: the stdlib handler writes headers and body in two
    # sends, and Nagle's algorithm against the client's delayed ACK holds the body ~40 ms on every keep-alive reply.
    http.server.BaseHTTPRequestHandler.disable_nagle_algorithm = True
    server = OpenAIServer(answer=slow_answer)
    server.start()
    print(f"URL {server.base_url}", flush=True)
    sys.stdin.read()
    server.stop()
    print(f"CALLS {server.total_calls}", flush=True)


if __name__ == "__main__":
    main()
