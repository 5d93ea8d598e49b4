"""The `openai` teacher against a real local OpenAI-compatible server with scripted faults."""

import base64
import json
import logging
import re
import socket
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from PIL import Image

from morer1.labels import DEFAULT_LABELS
from morer1.prompt import prompt_messages, teacher_instruction
from morer1.teacher_openai import OpenAITeacher, OpenAITeacherConfig
from morer1.teachers import TeacherRequest

KEY = "sk-test-9f8e7d6c5b4a-SECRET"
SLOW = "slow"  # answer only after the client's timeout


def answer(title: str) -> str:
    return f"<think>Step 1: {title}</think><answer>none</answer>"


class FakeServer:
    """POST /v1/chat/completions; per title, a script of faults for its first calls, then success."""

    def __init__(self, delay_s: float = 0.0, slow_s: float = 0.6):
        self.delay_s, self.slow_s = delay_s, slow_s
        self.script: dict[str, list] = {}
        self.calls: Counter = Counter()
        self.bodies: list[dict] = []
        self.auth: list[str | None] = []
        self.active = self.max_active = 0
        self.lock = threading.Lock()

    @property
    def total(self) -> int:
        return sum(self.calls.values())

    def handle(self, handler: BaseHTTPRequestHandler) -> None:
        body = json.loads(handler.rfile.read(int(handler.headers["Content-Length"])))
        title = re.search(r'News title: "(.*)"', body["messages"][1]["content"][2]["text"]).group(1)
        with self.lock:
            self.bodies.append(body)
            self.auth.append(handler.headers.get("Authorization"))
            n = self.calls[title]
            self.calls[title] += 1
            self.active += 1
            self.max_active = max(self.max_active, self.active)
        try:
            steps = self.script.get(title, [])
            action = steps[n] if n < len(steps) else "ok"
            time.sleep(self.slow_s if action == SLOW else self.delay_s)
            if action in (SLOW, "ok"):
                reply(handler, 200, {"choices": [{"message": {"role": "assistant", "content": answer(title)}}]})
            else:
                status, retry_after = action
                # An error body that echoes the request's credentials: the client must not log them.
                reply(handler, status, {"error": f"status {status}, got {handler.headers.get('Authorization')}"},
                      {"Retry-After": retry_after} if retry_after is not None else {})
        except OSError:  # the client gave up (timeout) and closed the connection
            pass
        finally:
            with self.lock:
                self.active -= 1


def reply(handler: BaseHTTPRequestHandler, status: int, payload: dict, headers: dict | None = None) -> None:
    data = json.dumps(payload).encode()
    handler.send_response(status)
    handler.send_header("Content-Type", "application/json")
    handler.send_header("Content-Length", str(len(data)))
    for name, value in (headers or {}).items():
        handler.send_header(name, value)
    handler.end_headers()
    handler.wfile.write(data)


@pytest.fixture
def server():
    fake = FakeServer()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):
            if self.path != "/v1/chat/completions":
                self.send_error(404)
                return
            fake.handle(self)

        def log_message(self, *args):
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    fake.base_url = f"http://127.0.0.1:{httpd.server_address[1]}/v1"
    yield fake
    httpd.shutdown()
    httpd.server_close()


def make_requests(tmp_path, titles) -> list[TeacherRequest]:
    """One request per title; the photo is a JPEG and the crop a PNG, as after ingest."""
    requests = []
    for i, title in enumerate(titles):
        photo, crop = tmp_path / f"photo{i}.jpg", tmp_path / f"crop{i}.png"
        Image.new("RGB", (32, 24), (i * 20 % 256, 80, 160)).save(photo, format="JPEG")
        Image.new("RGB", (8, 6), (200, i * 20 % 256, 10)).save(crop, format="PNG")
        fact = {"id": f"train-{i:06d}", "text": title, "entity": {"name": "Paris", "start": 2, "end": 3},
                "object": {"name": "woman", "box": [4, 4, 12, 10], "crop": crop.name, "caption": "a woman"},
                "relation": "/per/loc/place_of_residence", "object_type": "per", "entity_type": "loc",
                "width": 32, "height": 24, "image": photo.name}
        requests.append(TeacherRequest(fact, DEFAULT_LABELS, prompt_messages(fact, DEFAULT_LABELS),
                                       (str(photo), str(crop))))
    return requests


def config(server, tmp_path, **overrides) -> OpenAITeacherConfig:
    values = dict(base_url=server.base_url, model="teacher-x", concurrency=4, timeout_s=0.3, max_retries=5,
                  backoff_base_s=0.01, backoff_max_s=0.05, cache_dir=str(tmp_path / "cache"))
    return OpenAITeacherConfig(**{**values, **overrides})


def test_body_has_both_images_the_prompt_and_the_instruction_and_the_key(server, tmp_path, monkeypatch):
    monkeypatch.setenv("MORER1_TEACHER_API_KEY", KEY)
    (request,) = make_requests(tmp_path, ["Alice Smith visits Paris"])
    assert OpenAITeacher(config(server, tmp_path)).generate([request]) == [answer("Alice Smith visits Paris")]
    (body,) = server.bodies
    assert server.auth == [f"Bearer {KEY}"]
    assert (body["model"], body["temperature"], body["max_tokens"]) == ("teacher-x", 0.2, 1024)
    system, user = body["messages"]
    assert system == request.messages[0]
    photo, crop, prompt, instruction = user["content"]
    for part, path, mime in ((photo, request.images[0], "image/jpeg"), (crop, request.images[1], "image/png")):
        assert part["type"] == "image_url"
        head, data = part["image_url"]["url"].split(",", 1)
        assert head == f"data:{mime};base64" and base64.b64decode(data) == open(path, "rb").read()
    assert prompt == request.messages[1]["content"][2]
    assert instruction == {"type": "text", "text": teacher_instruction(request.fact)}
    assert "the correct label is /per/loc/place_of_residence" in instruction["text"]


def test_timeouts_500_and_429_are_retried_until_success(server, tmp_path):
    server.script["Faulty"] = [SLOW, (500, None), (429, "0"), (503, "100")]  # Retry-After 100 s capped to 0.05
    teacher = OpenAITeacher(config(server, tmp_path))
    start = time.monotonic()
    assert teacher.generate(make_requests(tmp_path, ["Faulty", "Fine"])) == [answer("Faulty"), answer("Fine")]
    assert time.monotonic() - start < 5
    assert server.calls == {"Faulty": 5, "Fine": 1}
    assert teacher.stats == {"requests": 6, "cache_hits": 0, "retries": 4, "completions": 2, "failures": {}}


def test_400_fails_at_once_and_retries_run_out(server, tmp_path):
    server.script["Bad"] = [(400, None)]
    server.script["Down"] = [(502, None)] * 10
    teacher = OpenAITeacher(config(server, tmp_path, max_retries=2))
    assert teacher.generate(make_requests(tmp_path, ["Bad", "Down", "Fine"])) == [None, None, answer("Fine")]
    assert server.calls == {"Bad": 1, "Down": 3, "Fine": 1}
    assert teacher.stats["failures"] == {"http_400": 1, "http_502": 1}
    assert teacher.stats["retries"] == 2


def test_connection_errors_are_retried_then_counted(tmp_path):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # closed again: nothing listens there
    cfg = OpenAITeacherConfig(base_url=f"http://127.0.0.1:{port}/v1", max_retries=2, backoff_base_s=0.01,
                              cache_dir=str(tmp_path / "cache"))
    teacher = OpenAITeacher(cfg)
    assert teacher.generate(make_requests(tmp_path, ["Nobody home"])) == [None]
    assert teacher.stats == {"requests": 3, "cache_hits": 0, "retries": 2, "completions": 0,
                             "failures": {"ConnectError": 1}}


def test_concurrency_is_bounded(server, tmp_path):
    server.delay_s = 0.1
    titles = [f"Title {i}" for i in range(12)]
    teacher = OpenAITeacher(config(server, tmp_path, concurrency=3, timeout_s=5))
    assert teacher.generate(make_requests(tmp_path, titles)) == [answer(t) for t in titles]
    assert server.max_active == 3


def test_a_rerun_pays_only_for_what_is_not_cached(server, tmp_path):
    server.script["Bad"] = [(400, None)]
    requests = make_requests(tmp_path, ["One", "Bad", "Two"])
    first = OpenAITeacher(config(server, tmp_path)).generate(requests)
    assert first == [answer("One"), None, answer("Two")] and server.total == 3
    rerun = OpenAITeacher(config(server, tmp_path))
    assert rerun.generate(requests) == [answer("One"), answer("Bad"), answer("Two")]
    assert server.total == 4 and rerun.stats["cache_hits"] == 2 and rerun.stats["requests"] == 1
    again = OpenAITeacher(config(server, tmp_path))
    assert again.generate(requests) == [answer("One"), answer("Bad"), answer("Two")]
    assert server.total == 4
    assert again.stats == {"requests": 0, "cache_hits": 3, "retries": 0, "completions": 0, "failures": {}}
    files = list((tmp_path / "cache").rglob("*"))
    assert sorted(p.suffix for p in files if p.is_file()) == [".json"] * 3


def test_key_never_reaches_logs_stats_or_cache(server, tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("MORER1_TEACHER_API_KEY", KEY)
    caplog.set_level(logging.DEBUG)
    server.script["Bad"] = [(401, None)]
    server.script["Down"] = [(500, None)] * 10
    teacher = OpenAITeacher(config(server, tmp_path, max_retries=1))
    assert teacher.generate(make_requests(tmp_path, ["Ok", "Bad", "Down"])) == [answer("Ok"), None, None]
    assert all(auth == f"Bearer {KEY}" for auth in server.auth)
    assert "failed (http_401)" in caplog.text and "Bearer ***" in caplog.text
    assert KEY not in caplog.text and KEY not in json.dumps(teacher.stats) and KEY not in repr(teacher.cfg)
    files = [p for p in (tmp_path / "cache").rglob("*") if p.is_file()]
    assert files and all(KEY.encode() not in p.read_bytes() for p in files)


def test_no_key_sends_no_authorization_and_warns_once(server, tmp_path, monkeypatch, caplog):
    monkeypatch.delenv("MORER1_TEACHER_API_KEY", raising=False)
    teacher = OpenAITeacher(config(server, tmp_path))
    teacher.generate(make_requests(tmp_path, ["A", "B"]))
    assert server.auth == [None, None]
    assert [r.message for r in caplog.records if r.levelno == logging.WARNING] == [
        "environment variable MORER1_TEACHER_API_KEY is not set: sending no api key (fine for a local server)"]
