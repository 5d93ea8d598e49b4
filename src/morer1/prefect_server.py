"""Prefect's temporary API server, launched before Prefect is imported.

Without `PREFECT_API_URL`, a Prefect flow starts a temporary server (`SubprocessASGIServer`) when it first needs
the API: after `import prefect` and after importing the server module (seconds of CPU) in the flow's process.
`launch()` starts the same command (uvicorn with Prefect's app factory, ephemeral: no UI, no services) at once,
in its own process, and points `PREFECT_API_URL` at it, so the server boots on one core while the flow's process
imports Prefect, MLflow and DVC on the other. Flow runs are stored where the temporary server stores them
(`PREFECT_HOME`). The process is stopped when this one exits.
"""

from __future__ import annotations

import atexit
import importlib.util
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

API_URL_ENV = "PREFECT_API_URL"


@dataclass
class Server:
    process: subprocess.Popen
    port: int

    @property
    def api_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/api"

    def wait_ready(self, timeout_s: float) -> None:
        """Return once `/api/health` answers 200; RuntimeError (with the server's exit code) after `timeout_s`."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"the temporary Prefect server on port {self.port} exited with code "
                                   f"{self.process.returncode} before it answered")
            try:
                with urllib.request.urlopen(f"{self.api_url}/health", timeout=2) as response:
                    if response.status == 200:
                        return
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            time.sleep(0.05)
        raise RuntimeError(f"the temporary Prefect server on port {self.port} did not answer within {timeout_s:.0f} s "
                           "(PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS)")

    def stop(self) -> None:
        """Terminate the server (kill it after 5 s)."""
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def free_port() -> int:
    """A TCP port free on the loopback interface now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch() -> Server | None:
    """Start Prefect's temporary server and set `PREFECT_API_URL` to it; None when a server is configured already.

    Call it before Prefect is imported: Prefect reads the setting once, at import.
    """
    if os.environ.get(API_URL_ENV):
        return None
    if "prefect" in sys.modules:
        raise RuntimeError("morer1.prefect_server.launch() must run before Prefect is imported")
    package = importlib.util.find_spec("prefect")
    if package is None or not package.submodule_search_locations:
        raise RuntimeError("prefect is not installed")
    app_dir = Path(next(iter(package.submodule_search_locations))).parent
    port = free_port()
    # The command and environment of prefect.server.api.server.SubprocessASGIServer (Prefect 3.8).
    process = subprocess.Popen(
        [sys.executable, "-m", "uvicorn", "--app-dir", str(app_dir), "--factory",
         "prefect.server.api.server:create_app", "--host", "127.0.0.1", "--port", str(port),
         "--log-level", "error", "--lifespan", "on"],
        env={**os.environ, "PREFECT_UI_ENABLED": "0", "PREFECT__SERVER_EPHEMERAL": "1", "PREFECT__SERVER_FINAL": "1"},
        stdin=subprocess.DEVNULL,
    )
    server = Server(process, port)
    atexit.register(server.stop)
    os.environ[API_URL_ENV] = server.api_url
    return server
