"""The temporary Prefect server launched before Prefect is imported: flows record their runs in it."""

import os
import subprocess
import sys
import textwrap

import pytest

SCRIPT = textwrap.dedent("""
    import os, sys
    from morer1 import prefect_server
    server = prefect_server.launch()
    assert os.environ["PREFECT_API_URL"] == server.api_url, os.environ["PREFECT_API_URL"]
    from prefect import flow
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL

    assert PREFECT_API_URL.value() == server.api_url

    @flow(name="launched-server-probe")
    def probe() -> int:
        return 7

    server.wait_ready(120)
    assert probe() == 7
    with get_client(sync_client=True) as client:
        runs = client.read_flow_runs()
    print("RUNS", sorted(r.state.name for r in runs), server.process.pid)
""")


def test_flow_runs_are_recorded_in_the_launched_server_which_stops_with_the_process(tmp_path):
    env = dict(os.environ, PREFECT_HOME=str(tmp_path / "prefect"), PREFECT_SERVER_ANALYTICS_ENABLED="false")
    env.pop("PREFECT_API_URL", None)
    proc = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    line = next(x for x in proc.stdout.splitlines() if x.startswith("RUNS"))
    assert "['Completed']" in line
    server_pid = int(line.split()[-1])
    with pytest.raises(ProcessLookupError):  # stopped at exit, not left behind
        os.kill(server_pid, 0)
    assert (tmp_path / "prefect" / "prefect.db").is_file()  # the runs went to PREFECT_HOME, as with Prefect's own


def test_launch_leaves_a_configured_server_alone_and_refuses_after_prefect_is_imported(monkeypatch):
    from morer1 import prefect_server

    monkeypatch.setenv("PREFECT_API_URL", "http://127.0.0.1:4200/api")
    assert prefect_server.launch() is None
    monkeypatch.delenv("PREFECT_API_URL")
    monkeypatch.setitem(sys.modules, "prefect", sys.modules.get("prefect") or object())
    with pytest.raises(RuntimeError, match="before Prefect is imported"):
        prefect_server.launch()
