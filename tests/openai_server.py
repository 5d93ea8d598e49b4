"""A local OpenAI-compatible chat-completions server for tests, failing a share of the calls deterministically.

Whether a call fails is a function of its request body and of how many times that body was asked before (its
attempt), never of timing or arrival order: which requests recover and which run out of retries is the same
on every run, so a test against it is not flaky. The way a failing call fails cycles through `faults` in
arrival order, so that every way occurs as soon as there are that many faults (it changes only timing and
the reason counted, not which calls fail). The server counts calls per body and the *successful
completions* per body: a valid 200 completion, what a paid service bills.

    with OpenAIServer(fault_rate=0.2) as server:
        ... base_url=server.base_url ...
        assert max(server.completions.values()) == 1
"""

from __future__ import annotations

import hashlib
import json
import re
import socket
import threading
from collections import Counter
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

# Every way a call fails: 500, 429, a 200 whose body is not JSON, a 200 without choices[0].message.content,
# a stall longer than the client's timeout (then the connection is closed unanswered), a dropped connection.
FAULTS = ("http_500", "http_429", "bad_json", "no_content", "stall", "drop")
NO_CONTENT_BODIES = (
    {"id": "x", "object": "chat.completion", "choices": []},
    {"id": "x", "object": "chat.completion", "choices": [{"index": 0, "message": {"role": "assistant"}}]},
    {"id": "x", "object": "chat.completion", "choices": [{"index": 0, "message": {"role": "assistant",
                                                                                  "content": None}}]},
    {"object": "error", "message": "upstream overloaded"},
)
GOLD_RE = re.compile(r"the correct label is (\S+?)\. ")


def body_key(body: dict) -> str:
    """The identity of a request: a hash of its JSON body with sorted keys."""
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode("utf-8")).hexdigest()


def _unit(*parts) -> float:
    """A deterministic number in [0, 1) from the parts."""
    digest = hashlib.sha256(":".join(map(str, parts)).encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2 ** 64


def gold_label(body: dict) -> str:
    """The gold label the teacher instruction of morer1 gives (the last text part of the user turn)."""
    text = body["messages"][-1]["content"][-1]["text"]
    return GOLD_RE.search(text).group(1)


def six_steps(label: str) -> str:
    """A well-formed rationale ending in `label`."""
    steps = " ".join(f"Step {i}: observation {i} about the photo, the crop and the title." for i in range(1, 6))
    return f"<think>{steps} Step 6: so the relation is {label}.</think><answer>{label}</answer>"


def gold_answer(body: dict, key: str) -> str:
    """What a good teacher writes: six steps ending in the gold label of the request."""
    return six_steps(gold_label(body))


class OpenAIServer:
    """POST /v1/chat/completions on 127.0.0.1 (a free port), in a background thread.

    fault_rate: share of the calls that fail (chosen by hash of body and attempt), in turn in each of `faults`.
    answer(body, key): the completion text of a call that does not fail (default: six steps to the gold label),
        or `(status, message)` for an error the request itself earns (e.g. 400: image too large).
    stall_s: how long a `stall` holds the call before closing it unanswered (set it above the client timeout).
    """

    def __init__(self, fault_rate: float = 0.0, faults: tuple[str, ...] = FAULTS, stall_s: float = 1.5,
                 answer: Callable[[dict, str], str | tuple[int, str]] = gold_answer, salt: str = ""):
        self.fault_rate, self.faults, self.stall_s, self.answer, self.salt = fault_rate, faults, stall_s, answer, salt
        self.calls: Counter = Counter()  # body key -> calls received
        self.completions: Counter = Counter()  # body key -> successful completions sent (what is billed)
        self.fault_counts: Counter = Counter()  # fault kind -> calls failed that way
        self.failed_calls: set[tuple[str, int]] = set()  # (body key, attempt) of the calls that failed
        self.lock = threading.Lock()
        self._closing = threading.Event()
        self._httpd: ThreadingHTTPServer | None = None

    @property
    def total_calls(self) -> int:
        return sum(self.calls.values())

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self._httpd.server_address[1]}/v1"

    def fails(self, key: str, attempt: int) -> bool:
        """Whether the `attempt`-th call (0-based) with this body fails."""
        return _unit(self.salt, key, attempt) < self.fault_rate

    def handle(self, handler: BaseHTTPRequestHandler) -> None:
        raw = handler.rfile.read(int(handler.headers["Content-Length"]))
        body = json.loads(raw)
        key = body_key(body)
        with self.lock:
            attempt = self.calls[key]
            self.calls[key] += 1
            kind = None
            if self.fails(key, attempt):
                kind = self.faults[len(self.failed_calls) % len(self.faults)]
                self.failed_calls.add((key, attempt))
                self.fault_counts[kind] += 1
        if kind == "stall":
            self._closing.wait(self.stall_s)
            handler.close_connection = True  # closed unanswered; the client has given up by now
        elif kind == "drop":
            handler.connection.shutdown(socket.SHUT_RDWR)
            handler.close_connection = True
        elif kind == "http_500":
            send_reply(handler, 500, b'{"error": {"message": "internal error", "type": "server_error"}}')
        elif kind == "http_429":
            send_reply(handler, 429, b'{"error": {"message": "rate limited", "type": "rate_limit"}}', {"Retry-After": "0"})
        elif kind == "bad_json":
            send_reply(handler, 200, b'{"id": "x", "choices": [{"message": {"role": "assistant", "content": "<think>Ste')
        elif kind == "no_content":
            variant = NO_CONTENT_BODIES[int(_unit(key, attempt, "variant") * len(NO_CONTENT_BODIES))]
            send_reply(handler, 200, json.dumps(variant).encode())
        elif isinstance(text := self.answer(body, key), tuple):
            status, message = text
            error = {"error": {"message": message, "type": "invalid_request_error"}}
            send_reply(handler, status, json.dumps(error).encode())
        else:
            payload = {"id": f"chatcmpl-{key[:12]}", "object": "chat.completion", "model": body.get("model"),
                       "choices": [{"index": 0, "finish_reason": "stop",
                                    "message": {"role": "assistant", "content": text}}]}
            send_reply(handler, 200, json.dumps(payload).encode())
            with self.lock:
                self.completions[key] += 1

    def start(self) -> OpenAIServer:
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                if self.path != "/v1/chat/completions":
                    self.send_error(404)
                    return
                try:
                    server.handle(self)
                except OSError:  # the client gave up and closed the connection
                    self.close_connection = True

            def log_message(self, *args):
                pass

        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self._httpd.serve_forever, args=(0.05,), daemon=True).start()
        return self

    def stop(self) -> None:
        self._closing.set()  # stalled calls end now
        self._httpd.shutdown()
        self._httpd.server_close()

    def __enter__(self) -> OpenAIServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def send_reply(handler: BaseHTTPRequestHandler, status: int, data: bytes, headers: dict | None = None) -> None:
    handler.send_response(status)
    handler.send_header("Content-Type", "application/json")
    handler.send_header("Content-Length", str(len(data)))
    for name, value in (headers or {}).items():
        handler.send_header(name, value)
    handler.end_headers()
    handler.wfile.write(data)
