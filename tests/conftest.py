import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")


def _isolate(mp: pytest.MonkeyPatch, state: Path) -> None:
    mp.setenv("MORER1_STATE_DIR", str(state))
    mp.delenv("MLFLOW_TRACKING_URI", raising=False)
    mp.delenv("MORER1_PARENT_RUN_ID", raising=False)


@pytest.fixture(scope="session", autouse=True)
def _session_state(tmp_path_factory):
    """Module-scoped fixtures (which run before per-test fixtures) track into a session store, never the repo's."""
    with pytest.MonkeyPatch.context() as mp:
        _isolate(mp, tmp_path_factory.mktemp("session-state"))
        yield


@pytest.fixture(autouse=True)
def _isolated_state(tmp_path, monkeypatch):
    """Every test tracks into its own MLflow store and never sees a pipeline parent run."""
    _isolate(monkeypatch, tmp_path / ".state")
