"""Fault: kill -9 during register/promote (issue 12, fault 2).

Promise: the served model never lacks a `champion` once it had one, and the rerun completes the registration once:
one candidate version per model, one copy of it in the served model, and the same final registry as a run that was
never killed.

Set-up: a real `mlflow server` (SQLite store, artifacts served by it) on 127.0.0.1, and in front of it a forwarding
proxy that only watches the requests go by. A served model gets a champion (model A, scored on data v1); then the
register stage of model B (scored on data v2, so promotion re-scores the champion on v2's dev facts) runs in a
subprocess of its own process group through the proxy, which SIGKILLs that group at one point of the registration:
before or just after a given registry request reached the server. The stage is then rerun (as `dvc repro` would
after the kill) and the registry compared with that of an uninterrupted run.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import mlflow
import pytest
from mlflow import MlflowClient
from servers import free_port, start_server, stop_group, wait_healthy
from test_registry import CORPUS, EVAL, chosen_json, write_dev

from configs import small_config
from morer1 import evaluate, registry
from morer1.registry import CHALLENGER, CHAMPION, RegisterConfig
from morer1.tiny_model import TinyModelConfig, build_tiny_model

pytestmark = pytest.mark.faults
BIN = Path(sys.executable).parent
ARTIFACTS = "/api/2.0/mlflow-artifacts/artifacts/"
STAGE = """
import json, sys
from morer1 import registry
registry.run(registry.RegisterConfig(**json.loads(sys.argv[1])), sys.argv[2], sys.argv[3])
"""


@dataclass
class Call:
    method: str
    path: str
    body: dict = field(default_factory=dict)


def _posted(call: Call, path: str, **body) -> bool:
    return call.method == "POST" and call.path == f"/api/2.0/mlflow/{path}" and all(
        call.body.get(k) == v for k, v in body.items())


# Where the stage is killed: (name, when, does this request match, given the requests before it). "before": the
# request never reaches the server; "after": the server has done it, the client dies before it hears back.
POINTS = [
    ("logging-the-model", "before", lambda c, seen, n: c.method == "PUT" and c.path.startswith(ARTIFACTS)),
    ("version-created", "after", lambda c, seen, n: _posted(c, "model-versions/create", name=f"{n}-candidates")),
    ("rescoring-the-champion", "before", lambda c, seen, n: c.method == "GET" and c.path.startswith(ARTIFACTS) and any(
        _posted(s, "registered-models/alias", name=f"{n}-candidates", alias=CHALLENGER) for s in seen)),
    ("champion-copied", "after", lambda c, seen, n: _posted(c, "model-versions/create", name=n)),
    ("champion-moved", "after", lambda c, seen, n: _posted(c, "registered-models/alias", name=n, alias=CHAMPION)),
    ("decision-half-tagged", "after",
     lambda c, seen, n: _posted(c, "model-versions/set-tag", name=f"{n}-candidates", key="promotion.reason")),
]


class Proxy:
    """Forwards every request to `upstream`; SIGKILLs the process group of `target` at the request `rule` picks."""

    def __init__(self, upstream: str):
        self.upstream, self.lock = upstream, threading.Lock()
        self.rule = self.target = self.hit = None
        self.seen: list[Call] = []
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def forward(self):
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                call = Call(self.command, urlsplit(self.path).path)
                if "json" in (self.headers.get("Content-Type") or "") and body:
                    call.body = json.loads(body)
                with proxy.lock:
                    when = proxy.rule(call, proxy.seen) if proxy.rule and proxy.hit is None else None
                    proxy.seen.append(call)
                if when == "before":
                    return proxy.kill(call)
                headers = {k: v for k, v in self.headers.items() if k.lower() not in ("host", "content-length")}
                reply = httpx.request(self.command, proxy.upstream + self.path, content=body, headers=headers,
                                      timeout=120)
                if when == "after":
                    return proxy.kill(call)
                self.send_response(reply.status_code)
                for key, value in reply.headers.items():
                    if key.lower() not in ("content-length", "content-encoding", "transfer-encoding", "connection"):
                        self.send_header(key, value)
                self.send_header("Content-Length", str(len(reply.content)))
                self.end_headers()
                self.wfile.write(reply.content)

            do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = forward

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.uri = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def kill(self, call: Call) -> None:
        self.hit = call
        os.killpg(self.target.pid, signal.SIGKILL)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """A real MLflow tracking server on loopback (SQLite store, proxied artifacts) and the watching proxy."""
    tmp = tmp_path_factory.mktemp("faults-mlflow")
    port, log = free_port(), tmp / "mlflow.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_TRACKING_")}
    proc = start_server([str(BIN / "mlflow"), "server", "--backend-store-uri", f"sqlite:///{tmp / 'mlflow.db'}",
                         "--artifacts-destination", str(tmp / "artifacts"), "--host", "127.0.0.1", "--port", str(port),
                         "--workers", "1"], log, dict(env, MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false"))
    try:
        wait_healthy(f"http://127.0.0.1:{port}/health", proc, log)
        proxy = Proxy(f"http://127.0.0.1:{port}")
        yield proxy
        proxy.server.shutdown()
    finally:
        stop_group(proc)
        mlflow.set_tracking_uri(None)  # later modules must not inherit this server


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Model A (the champion-to-be) and model B (the challenger, other weights' files), dev data v1 and v2, and the
    chosen.json of each as evaluate writes it."""
    root = tmp_path_factory.mktemp("faults-world")
    build_tiny_model(root / "a", CORPUS, small_config(TinyModelConfig, vocab_size=600))
    shutil.copytree(root / "a", root / "b")
    (root / "b" / "NOTE").write_text("challenger")
    v1 = write_dev(root / "v1", ["/per/loc/place_of_governance", "none", "/org/loc/locate_at"], 200)
    v2 = write_dev(root / "v2", ["none", "/per/loc/place_of_governance", "none", "/per/per/partner"], 90)
    dev1, dev2 = (evaluate.dev_set(v, EVAL.max_facts, EVAL.seed) for v in (v1, v2))
    (root / "ca").mkdir()
    (root / "cb").mkdir()
    return {"v1": v1, "v2": v2, "a": chosen_json(root / "ca", root / "a", {"dev_f1": 0.2}, dev1),
            "b": chosen_json(root / "cb", root / "b", {"dev_f1": 0.99}, dev2), "root": root}


def config(name: str, facts: Path) -> RegisterConfig:
    return small_config(RegisterConfig, model_name=name, candidates_model_name=f"{name}-candidates",
                        max_new_tokens=6, batch_size=2, facts=str(facts), min_pairs=1)  # v2: one photo


def champion_of(name: str):
    return registry.version_by_alias(MlflowClient(), name, CHAMPION)


def seeded(server, world, name: str, monkeypatch) -> str:
    """`name` with model A as champion, registered by the register stage in this process; its version."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", server.upstream)
    monkeypatch.chdir(world["root"])  # no dvc.lock here: data_version `none`, the same for every run
    summary = registry.run(config(name, world["v1"]), world["a"], world["root"] / f"out-{name}-a")
    assert summary["promotion"]["decision"] == "promoted"
    return str(champion_of(name).version)


def registry_state(name: str) -> dict:
    """Both models' versions with sources, aliases and tags, without what differs between two equal runs (names,
    timestamps, logged-model ids)."""
    client, state = MlflowClient(), {}
    for role, model in (("candidates", f"{name}-candidates"), ("served", name)):
        rows = []
        for v in sorted(client.search_model_versions(f"name = '{model}'"), key=lambda v: int(v.version)):
            tags = {k: val for k, val in v.tags.items() if k not in ("promotion.timestamp", "git_commit")}
            if "promotion" in tags:
                recorded = json.loads(tags["promotion"])
                tags["promotion"] = {k: val for k, val in recorded.items()
                                     if k not in ("timestamp", "model_name", "candidates_model_name")}
            source = v.source.replace(f"models:/{name}-candidates/", "candidate ")
            rows.append((str(v.version), "logged model" if source.startswith("models:/m-") else source,
                         sorted(v.aliases), tags))
        state[role] = rows
    return state


@pytest.fixture(scope="module")
def clean(server, world):
    """The registry after the register stage of B ran uninterrupted (in this process)."""
    with pytest.MonkeyPatch.context() as mp:
        seeded(server, world, "clean", mp)
        summary = registry.run(config("clean", world["v2"]), world["b"], world["root"] / "out-clean-b")
        assert summary["promotion"]["decision"] == "promoted" and "re-scored" in summary["promotion"]["reason"]
        return registry_state("clean")


@pytest.mark.parametrize(("point", "when", "rule"), POINTS, ids=[p[0] for p in POINTS])
def test_kill_during_register_then_rerun(server, world, clean, point, when, rule, monkeypatch, tmp_path):
    name = f"kill-{point}"
    old = seeded(server, world, name, monkeypatch)
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_TRACKING_")}
    env.update(MLFLOW_TRACKING_URI=server.uri, OMP_NUM_THREADS="1", MORER1_STATE_DIR=str(tmp_path / ".state"))
    server.seen, server.hit = [], None
    server.rule = lambda call, seen: when if rule(call, seen, name) else None
    with (tmp_path / "stage.log").open("w") as log:
        server.target = subprocess.Popen(
            [sys.executable, "-c", STAGE, config(name, world["v2"]).model_dump_json(), str(world["b"]),
             str(world["root"] / f"out-{name}")], cwd=world["root"], env=env, stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True)
        try:
            code = server.target.wait(timeout=600)
        finally:
            server.rule = None
            stop_group(server.target)
    output = (tmp_path / "stage.log").read_text()[-3000:]
    assert code == -signal.SIGKILL and server.hit is not None, f"never reached {point}:\n{output}"

    champion = champion_of(name)
    assert champion is not None, f"killed at {point} ({server.hit}), the served model lost its champion"
    candidates = MlflowClient().search_model_versions(f"name = '{name}-candidates'")
    assert len({v.tags["model_sha256"] for v in candidates}) == len(candidates) <= 2

    summary = registry.run(config(name, world["v2"]), world["b"], world["root"] / f"out-{name}")  # the rerun
    assert summary["promotion"]["decision"] == "promoted", summary["promotion"]
    assert registry_state(name) == clean
    assert str(champion_of(name).version) != old
    killed = MlflowClient().search_runs(
        [MlflowClient().get_experiment_by_name("morer1").experiment_id],
        filter_string=f"tags.`morer1.pid` = '{server.target.pid}'")
    assert [r.info.status for r in killed] == ["KILLED"], "the killed stage's run is not ended as KILLED"
