"""The team servers let no one in who does not belong (issue 12, part 4).

Against a real `mlflow server --app-name basic-auth` and a real `prefect server start` with an API auth string, both
on 127.0.0.1 with temporary stores and their own admin credentials, started and stopped here:

- MLflow: no or wrong credentials -> 401; `infra/servers/mlflow_auth_bootstrap.py` creates the accounts (twice: it is
  idempotent); the pipeline account, in a process of its own that reads its credentials from the environment, runs
  the register stage (`morer1.registry.run`, register.promote false): a stage run with the model, a version of
  `morer1-candidates` with alias `challenger`; it may not put a version in the served model `morer1` nor touch its
  `champion` (403), and `morer1.registry.promote` as the pipeline fails saying so; the promotion account promotes
  with `morer1.registry.promote` (copy into `morer1`, `champion` moved), but may not delete `champion`; a reader
  reads and downloads the champion, but may neither promote, move an alias nor log a run (403). No password reaches a
  server log or a command's output.
- Prefect: without the auth string, or with a wrong one -> 401; with it (`PREFECT_API_AUTH_STRING`) a flow runs.

And without servers: the compose file parses, publishes on 127.0.0.1 unless MORER1_BIND says otherwise, and carries
the same set-up; no credential is in a tracked file.
"""

from __future__ import annotations

import base64
import json
import os
import re
import secrets
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
import yaml
from servers import free_port, listening, start_server, stop_group, wait_healthy

ROOT = Path(__file__).resolve().parent.parent
SERVERS = ROOT / "infra" / "servers"
COMPOSE = SERVERS / "docker-compose.yml"
BOOTSTRAP = SERVERS / "mlflow_auth_bootstrap.py"
BIN = Path(sys.executable).parent
EXPERIMENT, MODEL, CANDIDATES = "morer1", "morer1", "morer1-candidates"
SECRET_NAME = re.compile(r"PASSWORD|SECRET|AUTH_STRING|READERS")


def _password() -> str:
    return secrets.token_urlsafe(18)  # 24 characters; MLflow wants 12+


@dataclass
class Servers:
    mlflow_uri: str
    prefect_api: str
    prefect_auth: str
    admin: tuple[str, str]
    accounts: dict[str, tuple[str, str]]  # role -> (username, password)
    folder: Path
    logs: list[Path] = field(default_factory=list)
    outputs: list[str] = field(default_factory=list)  # what commands run against the servers printed

    def secrets(self) -> list[str]:
        return [self.admin[1], self.prefect_auth, *(password for _, password in self.accounts.values())]


@pytest.fixture(scope="module")
def servers(tmp_path_factory):
    """Both servers on free loopback ports, with temporary stores; stopped (whole process groups) afterwards."""
    tmp = tmp_path_factory.mktemp("auth-servers")
    admin = ("admin", _password())
    accounts = {"pipeline": ("pipeline", _password()), "promoter": ("promoter", _password()),
                "reader": ("alice", _password())}
    ini = tmp / "basic_auth.ini"
    ini.write_text(
        "[mlflow]\n"
        "default_permission = READ\n"
        f"database_uri = sqlite:///{tmp / 'basic_auth.db'}\n"
        f"admin_username = {admin[0]}\n"
        "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n"
        "auth_cache_ttl_seconds = 600\n")
    base = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_TRACKING_", "PREFECT_API_"))}
    mlflow_env = dict(base, MLFLOW_AUTH_CONFIG_PATH=str(ini), MLFLOW_AUTH_ADMIN_PASSWORD=admin[1],
                      MLFLOW_FLASK_SERVER_SECRET_KEY=secrets.token_hex(16), OMP_NUM_THREADS="1",
                      MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false")  # no job-runner processes: morer1 runs no MLflow jobs
    prefect_auth = f"morer1:{_password()}"
    prefect_env = dict(base, PREFECT_HOME=str(tmp / "prefect-server"), PREFECT_SERVER_ANALYTICS_ENABLED="false",
                       PREFECT_SERVER_API_AUTH_STRING=prefect_auth)
    mlflow_port, prefect_port = free_port(), free_port()
    found = Servers(f"http://127.0.0.1:{mlflow_port}", f"http://127.0.0.1:{prefect_port}/api", prefect_auth, admin,
                    accounts, tmp, [tmp / "mlflow.log", tmp / "prefect.log"])
    procs = []
    try:
        procs.append(start_server(
            [str(BIN / "mlflow"), "server", "--app-name", "basic-auth",
             "--backend-store-uri", f"sqlite:///{tmp / 'mlflow.db'}", "--artifacts-destination", str(tmp / "artifacts"),
             "--host", "127.0.0.1", "--port", str(mlflow_port), "--workers", "1"], found.logs[0], mlflow_env))
        procs.append(start_server(
            [str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(prefect_port), "--no-ui"],
            found.logs[1], prefect_env))
        wait_healthy(f"{found.mlflow_uri}/health", procs[0], found.logs[0])  # /health is open under basic-auth
        wait_healthy(f"{found.prefect_api}/health", procs[1], found.logs[1])  # so is Prefect's
        yield found
    finally:
        for proc in procs:
            stop_group(proc)
    assert not listening(mlflow_port) and not listening(prefect_port)
    for log in found.logs:
        text = log.read_text(errors="replace")
        assert not [s for s in found.secrets() if s in text], f"a password is in {log.name}"


# ---------------------------------------------------------------- MLflow


def _run(cmd: list[str], env: dict, servers: Servers, cwd: Path | None = None) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True, timeout=300)
    servers.outputs += [proc.stdout, proc.stderr]
    assert proc.returncode == 0, f"{cmd}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


def _as(monkeypatch, servers: Servers, role: str) -> None:
    """The in-process MLflow client authenticates as `role` from now on (MLflow reads the variables per request)."""
    username, password = servers.admin if role == "admin" else servers.accounts[role]
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", username)
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", password)


def _status(call) -> int:
    """HTTP status of an MLflow client call: 200, or the status of the MlflowException it raised."""
    from mlflow.exceptions import MlflowException

    try:
        call()
    except MlflowException as exc:
        return exc.get_http_status_code()
    return 200


PIPELINE_ACTOR = """
import json, sys
from morer1 import registry
# MLFLOW_TRACKING_URI / _USERNAME / _PASSWORD from the environment, as in a DVC stage
print(json.dumps(registry.run(registry.RegisterConfig(**json.loads(sys.argv[1])), sys.argv[2], sys.argv[3])))
"""


@pytest.mark.e2e
def test_mlflow_refuses_requests_without_valid_credentials(servers):
    search = f"{servers.mlflow_uri}/api/2.0/mlflow/experiments/search"
    alias = f"{servers.mlflow_uri}/api/2.0/mlflow/registered-models/alias"
    username, password = servers.accounts["reader"]
    assert httpx.get(search, params={"max_results": 1}, timeout=30).status_code == 401
    assert httpx.get(search, params={"max_results": 1}, auth=(username, password + "x"), timeout=30).status_code == 401
    assert httpx.get(search, params={"max_results": 1}, auth=("nobody", password), timeout=30).status_code == 401
    body = {"name": MODEL, "alias": "champion", "version": "1"}
    assert httpx.post(alias, json=body, timeout=30).status_code == 401
    assert httpx.request("DELETE", alias, params={"name": MODEL, "alias": "champion"}, timeout=30).status_code == 401
    assert httpx.get(search, params={"max_results": 1}, auth=servers.admin, timeout=30).status_code == 200


@pytest.mark.e2e
def test_pipeline_registers_promoter_alone_moves_champion_reader_reads(servers, tmp_path, monkeypatch):
    import mlflow
    from mlflow import MlflowClient

    (pipeline, pipeline_pw), (promoter, promoter_pw) = servers.accounts["pipeline"], servers.accounts["promoter"]
    reader, reader_pw = servers.accounts["reader"]
    base = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_TRACKING_")}
    base.update(MLFLOW_TRACKING_URI=servers.mlflow_uri, OMP_NUM_THREADS="1")

    # The bootstrap, as compose's mlflow-auth-init runs it: everything from the environment; twice (idempotent).
    bootstrap_env = dict(base, MLFLOW_AUTH_ADMIN_USERNAME=servers.admin[0], MLFLOW_AUTH_ADMIN_PASSWORD=servers.admin[1],
                         MORER1_PIPELINE_USERNAME=pipeline, MORER1_PIPELINE_PASSWORD=pipeline_pw,
                         MORER1_PROMOTER_USERNAME=promoter, MORER1_PROMOTER_PASSWORD=promoter_pw,
                         MORER1_READERS=f"{reader}:{reader_pw}")
    for _ in range(2):
        out = _run([sys.executable, str(BOOTSTRAP)], bootstrap_env, servers).stdout
    assert f"user {pipeline} (pipeline): exists, password set" in out
    assert f"{pipeline}: registered_model {MODEL} -> default (READ)" in out
    assert f"{promoter}: registered_model {MODEL} -> EDIT" in out

    # The pipeline account, in a fresh process as a DVC stage would be: `morer1 register` with register.promote false
    # logs a stage run with the model and registers it as the candidates' `challenger`.
    from test_registry import CORPUS, EVAL, chosen_json, write_dev

    from configs import small_config
    from morer1 import evaluate, registry
    from morer1.errors import BadInputError
    from morer1.registry import RegisterConfig
    from morer1.tiny_model import TinyModelConfig, build_tiny_model

    build_tiny_model(tmp_path / "model", CORPUS, small_config(TinyModelConfig, vocab_size=600))
    dev_folder = write_dev(tmp_path / "dev", ["none", "/per/loc/place_of_governance"], 120)
    chosen = chosen_json(tmp_path, tmp_path / "model", {"dev_f1": 0.61},
                         evaluate.dev_set(dev_folder, EVAL.max_facts, EVAL.seed))
    # the `register` section as on the team servers: the register stage does not promote
    cfg = small_config(RegisterConfig, model_name=MODEL, candidates_model_name=CANDIDATES, promote=False,
                       facts=str(dev_folder), max_new_tokens=6, batch_size=2)
    pipeline_env = dict(base, MLFLOW_TRACKING_USERNAME=pipeline, MLFLOW_TRACKING_PASSWORD=pipeline_pw,
                        MORER1_STATE_DIR=str(tmp_path / ".state"), MORER1_EXPERIMENT=EXPERIMENT)
    pipeline_env.pop("MORER1_PARENT_RUN_ID", None)
    stage = [sys.executable, "-c", PIPELINE_ACTOR, cfg.model_dump_json(), str(chosen), str(tmp_path / "out")]
    summary = json.loads(_run(stage, pipeline_env, servers, cwd=tmp_path).stdout.strip().splitlines()[-1])
    assert (summary["model_name"], summary["promotion"]["decision"]) == (CANDIDATES, "deferred")

    monkeypatch.setenv("MLFLOW_TRACKING_URI", servers.mlflow_uri)
    client = MlflowClient(tracking_uri=servers.mlflow_uri, registry_uri=servers.mlflow_uri)
    _as(monkeypatch, servers, "pipeline")
    candidate = client.get_model_version_by_alias(CANDIDATES, "challenger")
    assert str(candidate.version) == summary["version"] and candidate.tags["dev_f1"] == "0.61"
    assert client.get_run(candidate.run_id).data.metrics["dev_f1"] == 0.61
    source = f"models:/{CANDIDATES}/{candidate.version}"
    assert _status(lambda: client.create_model_version(MODEL, source)) == 403, "the pipeline put a version in the served model"
    # `morer1 promote` (or the register stage with register.promote true) as the pipeline: refused, saying why.
    with pytest.raises(BadInputError, match=f"MLflow account {pipeline} may not write to registered model 'morer1'"):
        registry.promote(cfg)

    # A reader cannot promote either, nor log a run.
    _as(monkeypatch, servers, "reader")
    experiment_id = client.get_experiment_by_name(EXPERIMENT).experiment_id
    assert _status(lambda: client.create_model_version(MODEL, source)) == 403
    assert _status(lambda: client.set_registered_model_alias(CANDIDATES, "challenger", candidate.version)) == 403
    assert _status(lambda: client.create_run(experiment_id)) == 403
    with pytest.raises(BadInputError, match=f"MLflow account {reader} may not write to registered model 'morer1'"):
        registry.promote(cfg)
    assert client.search_model_versions(f"name = '{MODEL}'") == [] and "promotion.decision" not in (
        client.get_model_version(CANDIDATES, candidate.version).tags)

    # The promotion account promotes (`morer1 promote`, flows/promote.py): the challenger's copy becomes a version of
    # the served model, aliased champion, and the decision is recorded on the candidate.
    _as(monkeypatch, servers, "promoter")
    assert _status(lambda: client.create_run(experiment_id)) == 403, "the promoter logs no runs"
    decision = registry.promote(cfg)
    assert (decision["decision"], decision["reason"]) == ("promoted", "no champion yet")
    champion = client.get_model_version_by_alias(MODEL, "champion")
    assert champion.source == source and str(champion.version) == decision["served_version"]
    assert champion.tags["dev_f1"] == "0.61"  # the copy keeps the tags
    assert json.loads(champion.tags["promotion"])["decision"] == "promoted"
    assert client.get_model_version(CANDIDATES, candidate.version).tags["promotion.decision"] == "promoted"
    assert registry.promote(cfg)["decision"] == "already_champion"
    # EDIT sets and moves aliases; deleting one needs MANAGE, which no morer1 account has: champion never goes away.
    assert _status(lambda: client.delete_registered_model_alias(MODEL, "champion")) == 403

    # Neither the pipeline nor a reader can move the champion past the promotion gate, or remove it.
    for role in ("pipeline", "reader"):
        _as(monkeypatch, servers, role)
        assert _status(lambda: client.set_registered_model_alias(MODEL, "champion", champion.version)) == 403, role
        assert _status(lambda: client.delete_registered_model_alias(MODEL, "champion")) == 403, role
        assert _status(lambda: client.set_registered_model_tag(MODEL, "owner", role)) == 403, role

    # Everyone reads: the reader resolves and downloads the champion through the artifact proxy.
    _as(monkeypatch, servers, "reader")
    assert client.get_model_version_by_alias(MODEL, "champion").version == champion.version
    folder = mlflow.artifacts.download_artifacts(artifact_uri=f"models:/{MODEL}@champion",
                                                 tracking_uri=servers.mlflow_uri, dst_path=str(tmp_path / "champion"))
    assert (Path(folder) / "MLmodel").is_file()

    assert not [s for s in servers.secrets() if any(s in text for text in servers.outputs)], "a password was printed"


# ---------------------------------------------------------------- Prefect

PREFECT_FLOW = """
from prefect import flow

@flow(name="morer1-auth-probe")
def probe() -> int:
    return 42

assert probe() == 42
"""


@pytest.mark.e2e
def test_prefect_api_needs_the_auth_string(servers, tmp_path):
    api = servers.prefect_api
    wrong = "morer1:" + _password()
    assert httpx.get(f"{api}/health", timeout=30).status_code == 200  # open for probes (compose's healthcheck)
    assert httpx.post(f"{api}/flows/filter", json={}, timeout=30).status_code == 401
    assert httpx.post(f"{api}/flows/filter", json={}, timeout=30,
                      headers={"Authorization": "Basic " + base64.b64encode(wrong.encode()).decode()}).status_code == 401
    user, password = servers.prefect_auth.split(":", 1)
    assert httpx.post(f"{api}/flows/filter", json={}, auth=(user, password), timeout=30).status_code == 200

    base = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_API_")}
    base.update(PREFECT_API_URL=api, PREFECT_HOME=str(tmp_path / "prefect-client"))
    refused = subprocess.run([sys.executable, "-c", PREFECT_FLOW], env=base, capture_output=True, text=True,
                             timeout=300)
    assert refused.returncode != 0 and "401" in refused.stderr, refused.stderr[-3000:]
    _run([sys.executable, "-c", PREFECT_FLOW], dict(base, PREFECT_API_AUTH_STRING=servers.prefect_auth), servers)
    body = {"flows": {"name": {"any_": ["morer1-auth-probe"]}}}
    runs = httpx.post(f"{api}/flow_runs/filter", json=body, auth=(user, password), timeout=30).raise_for_status().json()
    assert [r["state_type"] for r in runs] == ["COMPLETED"]
    assert not [s for s in servers.secrets() if any(s in text for text in servers.outputs)], "a secret was printed"


# ---------------------------------------------------------------- the compose file and tracked files


def _interpolate(value: str, env: dict[str, str]) -> str:
    """Compose's `${VAR}`, `${VAR:-default}` and `${VAR:?error}` (the forms the file uses)."""
    def one(match):
        name, op, arg = match.group(1), match.group(2), match.group(3)
        if env.get(name):
            return env[name]
        if op == ":?":
            raise KeyError(f"{name}: {arg}")
        return arg if op == ":-" else ""

    return re.sub(r"\$\{(\w+)(?:(:-|:\?)([^}]*))?\}", one, value)


def test_compose_publishes_on_loopback_and_carries_the_auth_set_up():
    compose = yaml.safe_load(COMPOSE.read_text())
    services = compose["services"]
    published = {name: [str(p) for p in spec.get("ports", [])] for name, spec in services.items() if "ports" in spec}
    assert set(published) == {"minio", "mlflow", "prefect"}
    for name, ports in published.items():
        for port in ports:
            assert _interpolate(port, {}).startswith("127.0.0.1:"), f"{name} publishes {port} beyond loopback"
            assert _interpolate(port, {"MORER1_BIND": "10.1.2.3"}).startswith("10.1.2.3:")

    mlflow = services["mlflow"]
    command = [str(c) for c in mlflow["command"]]
    assert command[command.index("--app-name") + 1] == "basic-auth"
    assert all("@" not in c or ":" not in c.split("@")[0].split("//")[-1] for c in command), "a password in a URI"
    config_path = mlflow["environment"]["MLFLOW_AUTH_CONFIG_PATH"]
    assert f"./basic_auth.ini:{config_path}:ro" in mlflow["volumes"]
    for name in ("MLFLOW_AUTH_ADMIN_PASSWORD", "MLFLOW_FLASK_SERVER_SECRET_KEY", "PGPASSWORD"):
        assert ":?" in mlflow["environment"][name], f"mlflow starts without {name}"
    init = services["mlflow-auth-init"]
    assert init["depends_on"]["mlflow"]["condition"] == "service_healthy"
    assert "./mlflow_auth_bootstrap.py:/bootstrap/mlflow_auth_bootstrap.py:ro" in init["volumes"]
    assert init["command"][-1] == "/bootstrap/mlflow_auth_bootstrap.py"
    assert ":?" in services["prefect"]["environment"]["PREFECT_SERVER_API_AUTH_STRING"]
    assert "flask-wtf" in (SERVERS / "mlflow.Dockerfile").read_text().lower(), "the basic-auth app needs Flask-WTF"


def test_tracked_auth_config_reads_as_mlflow_reads_it(monkeypatch):
    from mlflow.server.auth.config import read_auth_config

    monkeypatch.setenv("MLFLOW_AUTH_CONFIG_PATH", str(SERVERS / "basic_auth.ini"))
    for name in ("MLFLOW_AUTH_ADMIN_USERNAME", "MLFLOW_AUTH_ADMIN_PASSWORD"):
        monkeypatch.delenv(name, raising=False)
    config = read_auth_config()
    assert config.default_permission == "READ"
    assert config.admin_password is None, "the admin password comes from the environment only"
    assert config.database_uri.startswith("postgresql://mlflow@"), "no password in the auth database URI"


def _tracked() -> list[str]:
    return subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()


def test_no_credential_in_tracked_files():
    tracked = _tracked()
    assert not [p for p in tracked if Path(p).name == ".env"], "a .env file is tracked"
    for env_file in (".env", "infra/servers/.env"):
        assert subprocess.run(["git", "check-ignore", "-q", env_file], cwd=ROOT).returncode == 0, f"{env_file} not ignored"

    example = dict(line.split("=", 1) for line in (SERVERS / ".env.example").read_text().splitlines()
                   if line and not line.startswith("#"))
    assert {k: v for k, v in example.items() if SECRET_NAME.search(k) and v}  == {}, ".env.example holds a secret"

    services = yaml.safe_load(COMPOSE.read_text())["services"]
    for name, spec in services.items():
        for key, value in (spec.get("environment") or {}).items():
            if SECRET_NAME.search(key) or key.endswith("_KEY"):
                assert str(value).startswith("${"), f"{name}.{key} is not taken from the environment"

    # An upper-case secret variable given a literal value anywhere in a tracked text file: references like $X, ${X},
    # <...>, ... and … placeholders are fine, and so, in Python, are names (only a quoted literal counts there).
    # Compose's `${X:?error}` and `${X:-}` are fine; `${X:-literal}` would be a default password, so not.
    value = r"(?!-\})([^\s\"'$<{.…)\],?]\S*)"
    name = r"\b[A-Z][A-Z0-9_]*(?:PASSWORD|AUTH_STRING|SECRET_KEY)\b[\"']?[ \t]*[=:][ \t]*"
    literal = {"text": re.compile(name + r"[\"']?" + value), "python": re.compile(name + r"[\"']" + value)}
    found = []
    for path in tracked:
        file = ROOT / path
        if not file.is_file() or file.stat().st_size > 1_000_000:
            continue
        try:
            text = file.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            continue
        pattern = literal["python" if path.endswith(".py") else "text"]
        found += [f"{path}: {m.group(0)}" for m in pattern.finditer(text)]
    assert found == [], found
