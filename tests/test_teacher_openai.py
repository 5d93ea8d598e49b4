"""The `openai` teacher against a real local OpenAI-compatible server with scripted faults."""

import base64
import json
import logging
import re
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest
from PIL import Image
from pydantic import ValidationError
from openai_server import send_reply
from servers import free_port

from morer1.errors import BadInputError
from morer1.labels import DEFAULT_LABELS
from morer1.prompt import prompt_messages, teacher_instruction
from morer1.teacher_openai import OpenAITeacher, OpenAITeacherConfig, TeacherError
from morer1.teachers import TeacherRequest

KEY = "sk-test-9f8e7d6c5b4a-SECRET"
SLOW = "slow"  # answer only after the client's timeout
BAD_JSON = "bad_json"  # 200 whose body is cut mid-JSON
NO_CONTENT = "no_content"  # 200 whose JSON has no choices[0].message.content


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
            elif action == BAD_JSON:
                reply(handler, 200, '{"choices": [{"message": {"content": "<think>Step 1')
            elif action == NO_CONTENT:
                reply(handler, 200, {"choices": [{"message": {"role": "assistant", "content": None}}]})
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


def reply(handler: BaseHTTPRequestHandler, status: int, payload: dict | str, headers: dict | None = None) -> None:
    send_reply(handler, status, (payload if isinstance(payload, str) else json.dumps(payload)).encode(), headers)


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


def test_a_200_that_is_not_a_completion_is_retried_like_a_5xx(server, tmp_path):
    server.script["Garbled"] = [BAD_JSON, NO_CONTENT, (500, None)]
    server.script["Empty"] = [NO_CONTENT] * 10
    teacher = OpenAITeacher(config(server, tmp_path, max_retries=3))
    assert teacher.generate(make_requests(tmp_path, ["Garbled", "Empty", "Fine"])) == [
        answer("Garbled"), None, answer("Fine")]
    assert server.calls == {"Garbled": 4, "Empty": 4, "Fine": 1}
    assert teacher.stats == {"requests": 9, "cache_hits": 0, "retries": 6, "completions": 2,
                             "failures": {"bad_response": 1}}


def test_an_unreachable_endpoint_stops_the_run_quickly_with_one_line_naming_the_url(tmp_path):
    url = f"http://127.0.0.1:{free_port()}/v1"  # nothing listens there
    cfg = OpenAITeacherConfig(base_url=url, max_retries=3, backoff_base_s=0.05, concurrency=2,
                              cache_dir=str(tmp_path / "cache"))
    teacher = OpenAITeacher(cfg)
    start = time.monotonic()
    with pytest.raises(TeacherError) as err:
        teacher.generate(make_requests(tmp_path, [f"Nobody home {i}" for i in range(20)]))
    assert time.monotonic() - start < 5
    message = str(err.value)
    assert isinstance(err.value, BadInputError) and "\n" not in message
    assert message.startswith(f"teacher endpoint {url}/chat/completions is unreachable: ConnectError on 4 attempts")
    assert teacher.stats["requests"] <= 2 * 4  # stopped with the first request: the other 18 never went out


def test_an_endpoint_failing_every_request_stops_the_run(server, tmp_path, monkeypatch):
    monkeypatch.setenv("MORER1_TEACHER_API_KEY", KEY)  # the 401 body echoes it: the message must not
    titles = [f"Title {i}" for i in range(12)]
    for title in titles:
        server.script[title] = [(401, None)]
    teacher = OpenAITeacher(config(server, tmp_path, concurrency=2, max_consecutive_failures=3))
    with pytest.raises(TeacherError, match=r"is failing: 3 requests in a row failed after their retries with no "
                                           r"completion in between \(http_401 3\); last: http_401 after 1 attempts"
                                           r": .*Bearer \*\*\*") as err:
        teacher.generate(make_requests(tmp_path, titles))
    assert KEY not in str(err.value) and "\n" not in str(err.value)
    assert server.total <= 4  # the third failure and the two requests in flight then, at most


def test_a_stalled_endpoint_stops_the_run_after_the_timeouts(server, tmp_path):
    titles = [f"Title {i}" for i in range(8)]
    for title in titles:
        server.script[title] = [SLOW] * 10
    teacher = OpenAITeacher(config(server, tmp_path, concurrency=4, timeout_s=0.2, max_retries=1))
    start = time.monotonic()
    with pytest.raises(TeacherError, match=r"is failing: 3 requests in a row .*\(timeout 3\)"):
        teacher.generate(make_requests(tmp_path, titles))
    assert time.monotonic() - start < 3  # 2 attempts of 0.2 s each, not 8 requests x 2 attempts
    assert teacher.stats["completions"] == 0


def test_a_success_between_failures_keeps_the_run_going(server, tmp_path):
    order = ["Bad 0", "Bad 1", "Fine", "Bad 2", "Bad 3"]  # one at a time in this order: never 3 failures in a row
    for title in order:
        if title.startswith("Bad"):
            server.script[title] = [(400, None)]
    teacher = OpenAITeacher(config(server, tmp_path, concurrency=1, max_consecutive_failures=3))
    assert teacher.generate(make_requests(tmp_path, order)) == [None, None, answer("Fine"), None, None]
    assert teacher.stats["failures"] == {"http_400": 4}


def test_identical_requests_in_flight_are_paid_once(server, tmp_path):
    server.delay_s = 0.2
    (request,) = make_requests(tmp_path, ["Twice"])
    teacher = OpenAITeacher(config(server, tmp_path, concurrency=4))
    assert teacher.generate([request, request, request]) == [answer("Twice")] * 3
    assert server.calls == {"Twice": 1}
    assert teacher.stats["completions"] == 1 and teacher.stats["cache_hits"] == 2


def test_connect_and_read_timeouts_are_separate(server, tmp_path, monkeypatch):
    seen = {}
    real = httpx.Client.__init__

    def spy(self, *args, **kwargs):
        seen["timeout"] = kwargs["timeout"]
        real(self, *args, **kwargs)

    monkeypatch.setattr(httpx.Client, "__init__", spy)
    OpenAITeacher(config(server, tmp_path, timeout_s=45.0, connect_timeout_s=4.0)).generate(
        make_requests(tmp_path, ["One"]))
    assert seen["timeout"] == httpx.Timeout(45.0, connect=4.0)
    defaults = OpenAITeacherConfig()
    assert (defaults.timeout_s, defaults.connect_timeout_s) == (60.0, 10.0)


def test_base_url_must_be_http():
    with pytest.raises(ValidationError, match="must start with http:// or https://"):
        OpenAITeacherConfig(base_url="127.0.0.1:8000/v1")
    cfg = OpenAITeacherConfig(base_url="https://api.example.com/v1/")
    assert cfg.url == "https://api.example.com/v1/chat/completions"


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
