"""Teacher on any OpenAI-compatible chat-completions endpoint: bounded concurrency, retries, a disk cache.

The api key is read from the environment variable named in the config; it is sent in the
`Authorization` header only, and never logged, cached or put in the stats.

Faults are handled as from a paid service. Transient ones (connection errors, timeouts, 429, 5xx, and a
200 whose body is not a completion) are retried with backoff; a request that still fails is returned as
None and counted by reason. The run stops with a `TeacherError` (one line naming the URL) when the
endpoint is unreachable, or when `max_consecutive_failures` requests in a row fail with no completion in
between: the endpoint is down or refuses every request, and going on would only burn time.
"""

from __future__ import annotations

import base64
import email.utils
import hashlib
import json
import logging
import os
import random
import tempfile
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path

import httpx
from PIL import Image
from pydantic import Field, field_validator
from tqdm import tqdm

from morer1.errors import BadInputError
from morer1.params import StageConfig
from morer1.prompt import teacher_instruction
from morer1.teachers import TeacherRequest

log = logging.getLogger(__name__)

RETRY_STATUS = frozenset({429}) | frozenset(range(500, 600))
CONNECT_FAILURES = frozenset({"ConnectError", "ConnectTimeout"})  # nothing answered: the endpoint is unreachable


class TeacherError(BadInputError):
    """The endpoint cannot serve this run: unreachable, failing every request, or misconfigured (exit code 2).

    Completions received before it are cached: a rerun once the endpoint works pays only for the others.
    """


class OpenAITeacherConfig(StageConfig):
    """Endpoint, concurrency, retry and cache settings of the `openai` teacher."""

    base_url: str = Field("http://127.0.0.1:8000/v1",
                          description="Base URL of the API; `/chat/completions` is appended.")
    model: str = Field("Qwen/Qwen2.5-VL-72B-Instruct", description="Model name sent in each request.")
    api_key_env: str = Field("MORER1_TEACHER_API_KEY",
                             description="Name of the environment variable holding the api key (unset: no key sent).")
    concurrency: int = Field(8, ge=1, description="At most this many requests in flight.")
    timeout_s: float = Field(
        60.0, gt=0,
        description="Longest wait for the response to one request once connected (and for sending it), in seconds. "
                    "A completion is not streamed: this must cover max_tokens at the server's slowest speed "
                    "(1024 tokens at 20 tokens/s is ~50 s). Shorter cuts long rationales, which the server still "
                    "generates and bills, and the retry pays again; longer lets a stalled server hold a worker longer.")
    connect_timeout_s: float = Field(
        10.0, gt=0, description="Longest wait to open a connection, in seconds: an endpoint that accepts none is down.")
    max_retries: int = Field(5, ge=0,
                             description="Retries after the first attempt on timeouts, connection errors, 429, 5xx "
                                         "and a 200 whose body is not a completion.")
    backoff_base_s: float = Field(1.0, ge=0,
                                  description="Retry n waits a random time up to backoff_base_s * 2**n (full jitter).")
    backoff_max_s: float = Field(30.0, ge=0, description="Cap of one wait between retries, Retry-After included.")
    temperature: float = Field(0.2, ge=0, description="Sampling temperature of the teacher.")
    max_tokens: int = Field(1024, ge=1, description="Maximum completion tokens per rationale.")
    cache_dir: str = Field(".state/teacher-cache",
                           description="Completions cached by request hash; a rerun pays only for the missing ones.")
    max_consecutive_failures: int = Field(
        3, ge=1, description="Stop the run (TeacherError) when this many requests in a row fail after their retries "
                             "with no completion in between; an unreachable endpoint stops it at the first.")

    @field_validator("base_url")
    @classmethod
    def _http_url(cls, value: str) -> str:
        if not value.startswith(("http://", "https://")):
            raise ValueError(f"must start with http:// or https://, got {value!r}")
        return value

    @property
    def url(self) -> str:
        """The chat-completions URL requests go to."""
        return self.base_url.rstrip("/") + "/chat/completions"


def data_url(path: str | Path) -> str:
    """The file as a base64 `data:` URL, its mime type read from the image itself."""
    try:
        with Image.open(path) as img:
            mime = img.get_format_mimetype()
        raw = Path(path).read_bytes()
    except OSError as exc:
        raise BadInputError(f"{path}: cannot read teacher image: {exc}") from exc
    return f"data:{mime};base64,{base64.b64encode(raw).decode('ascii')}"


def chat_messages(request: TeacherRequest) -> list[dict]:
    """The request's turns in OpenAI form: images as data URLs, the gold-conditioned instruction appended."""
    images = iter(request.images)
    out = []
    for turn in request.messages:
        parts = []
        for part in turn["content"]:
            if part["type"] == "image":
                parts.append({"type": "image_url", "image_url": {"url": data_url(next(images))}})
            else:
                parts.append(part)
        if turn["role"] == "user":
            parts.append({"type": "text", "text": teacher_instruction(request.fact)})
        out.append({"role": turn["role"], "content": parts})
    return out


def retry_after_s(response: httpx.Response) -> float | None:
    """Seconds asked by a `Retry-After` header (delta or HTTP date), None when absent or unreadable."""
    value = response.headers.get("retry-after")
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        return max(0.0, email.utils.parsedate_to_datetime(value).timestamp() - time.time())
    except (TypeError, ValueError):
        return None


class OpenAITeacher:
    """Asks an OpenAI-compatible endpoint for one rationale per request; `stats` counts what happened."""

    def __init__(self, cfg: OpenAITeacherConfig):
        self.cfg = cfg
        self._key = os.environ.get(cfg.api_key_env) or None
        if self._key is None:
            log.warning("environment variable %s is not set: sending no api key (fine for a local server)",
                        cfg.api_key_env)
        self._cache = Path(cfg.cache_dir)
        self._lock = threading.Lock()
        self._counts: Counter = Counter()
        self._failures: Counter = Counter()
        self._streak: Counter = Counter()  # reasons of the requests failed since the last completion
        self._inflight: dict[Path, threading.Lock] = {}  # one lock per cache entry: identical requests pay once
        self._stop = threading.Event()  # set when the run is stopped: workers give up before their next attempt

    @property
    def stats(self) -> dict:
        """Requests sent (attempts), cache hits, retries, new completions, failures by reason; over all calls."""
        with self._lock:
            return {"requests": self._counts["requests"], "cache_hits": self._counts["cache_hits"],
                    "retries": self._counts["retries"], "completions": self._counts["completions"],
                    "failures": dict(sorted(self._failures.items()))}

    def generate(self, requests: list[TeacherRequest]) -> list[str | None]:
        """One completion per request, in request order; None when it failed (see `stats["failures"]`).

        Raises TeacherError when the endpoint is unreachable or fails every request (see the module doc).
        """
        results: list[str | None] = [None] * len(requests)
        headers = {"Authorization": f"Bearer {self._key}"} if self._key else {}
        limits = httpx.Limits(max_connections=self.cfg.concurrency)
        timeout = httpx.Timeout(self.cfg.timeout_s, connect=self.cfg.connect_timeout_s)
        self._stop.clear()
        with (httpx.Client(headers=headers, timeout=timeout, limits=limits) as client,
              tqdm(total=len(requests), desc="teacher", unit="req", disable=None) as bar):
            pool = ThreadPoolExecutor(max_workers=self.cfg.concurrency, thread_name_prefix="teacher")
            try:
                futures = {pool.submit(self._one, client, r): i for i, r in enumerate(requests)}
                for future in as_completed(futures):
                    results[futures[future]] = future.result()
                    bar.update()
            except BaseException:
                self._stop.set()  # the requests in flight end after their current attempt
                raise
            finally:
                pool.shutdown(wait=True, cancel_futures=True)
        log.info("teacher: %s", self.stats)
        return results

    def _count(self, key: str) -> None:
        with self._lock:
            self._counts[key] += 1

    def _redact(self, text: str) -> str:
        return text.replace(self._key, "***") if self._key else text

    def _detail(self, text: str) -> str:
        """A server's text as one short line, the key masked."""
        return " ".join(self._redact(text).split())[:200]

    def _succeeded(self) -> None:
        with self._lock:
            self._counts["completions"] += 1
            self._streak.clear()

    def _failed(self, request: TeacherRequest, reason: str, detail: str, attempts: int, since: float) -> None:
        """Count a request that failed for good; stop the run when the endpoint looks down (module doc)."""
        with self._lock:
            self._failures[reason] += 1
            self._streak[reason] += 1
            in_a_row = sum(self._streak.values())
            streak = ", ".join(f"{r} {n}" for r, n in self._streak.most_common())
            stopping = not self._stop.is_set() and (
                reason in CONNECT_FAILURES or in_a_row >= self.cfg.max_consecutive_failures)
            if stopping:
                self._stop.set()
        detail = self._detail(detail)
        if reason in CONNECT_FAILURES and stopping:
            raise TeacherError(
                f"teacher endpoint {self.cfg.url} is unreachable: {reason} on {attempts} attempts over "
                f"{time.monotonic() - since:.1f} s ({detail}); check synthesize.openai.base_url and that the "
                f"server is up")
        if stopping:
            raise TeacherError(
                f"teacher endpoint {self.cfg.url} is failing: {in_a_row} requests in a row failed after their "
                f"retries with no completion in between ({streak}); last: {reason} after {attempts} attempts: "
                f"{detail}")
        if not self._stop.is_set():
            log.warning("teacher: fact %s failed (%s) after %d attempts: %s", request.fact.get("id"), reason,
                        attempts, detail)

    def _one(self, client: httpx.Client, request: TeacherRequest) -> str | None:
        if self._stop.is_set():
            return None
        body = {"model": self.cfg.model, "messages": chat_messages(request),
                "temperature": self.cfg.temperature, "max_tokens": self.cfg.max_tokens}
        path = self._cache_path(body)
        with self._lock:
            inflight = self._inflight.setdefault(path, threading.Lock())
        with inflight:  # an identical request in flight is awaited, then read from the cache: paid once
            cached = self._read_cache(path)
            if cached is not None:
                self._count("cache_hits")
                return cached
            text = self._post(client, request, body)
            if text is not None:
                self._write_cache(path, text)
        return text

    def _post(self, client: httpx.Client, request: TeacherRequest, body: dict) -> str | None:
        since = time.monotonic()
        for attempt in range(self.cfg.max_retries + 1):
            if self._stop.is_set():
                return None
            if attempt:
                self._count("retries")
            self._count("requests")
            wait = None
            try:
                response = client.post(self.cfg.url, json=body)
            except httpx.TimeoutException as exc:
                reason, detail = ("ConnectTimeout" if isinstance(exc, httpx.ConnectTimeout) else "timeout"), str(exc)
            except (httpx.NetworkError, httpx.RemoteProtocolError) as exc:
                reason, detail = type(exc).__name__, str(exc)
            except httpx.TransportError as exc:  # unsupported protocol, proxy or local protocol error: not transient
                self._stop.set()
                raise TeacherError(f"cannot send requests to {self.cfg.url}: {type(exc).__name__}: "
                                   f"{self._detail(str(exc))}") from exc
            else:
                if response.is_success:
                    content = self._content(response)
                    if content is not None:
                        self._succeeded()
                        return content
                    # A 200 that is not a completion (cut or garbled body, no choices/message/content): transient.
                    reason, detail = "bad_response", response.text[:300]
                else:
                    reason, detail = f"http_{response.status_code}", response.text[:300]
                    if response.status_code not in RETRY_STATUS:
                        self._failed(request, reason, detail, attempt + 1, since)
                        return None
                    wait = retry_after_s(response)
            if attempt == self.cfg.max_retries:
                break
            if wait is None:
                wait = random.uniform(0.0, self.cfg.backoff_base_s * 2 ** attempt)
            if self._stop.wait(min(wait, self.cfg.backoff_max_s)):
                return None
        self._failed(request, reason, detail, self.cfg.max_retries + 1, since)
        return None

    @staticmethod
    def _content(response: httpx.Response) -> str | None:
        """`choices[0].message.content` of a 200, None when the body is not JSON or has no such text."""
        try:
            content = response.json()["choices"][0]["message"]["content"]
        except (ValueError, KeyError, IndexError, TypeError):
            return None
        return content if isinstance(content, str) else None

    def _cache_path(self, body: dict) -> Path:
        digest = hashlib.sha256(json.dumps(body, sort_keys=True).encode("utf-8")).hexdigest()
        return self._cache / digest[:2] / f"{digest}.json"

    def _read_cache(self, path: Path) -> str | None:
        try:
            return json.loads(path.read_text(encoding="utf-8"))["content"]
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def _write_cache(self, path: Path, text: str) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile("w", encoding="utf-8", dir=path.parent, suffix=".tmp", delete=False) as f:
            json.dump({"model": self.cfg.model, "content": text}, f, ensure_ascii=False)
            f.flush()
            os.fsync(f.fileno())
        os.replace(f.name, path)
