"""Helpers for tests that start real servers on 127.0.0.1 in their own process groups, or hold the pipeline lock."""

import contextlib
import os
import signal
import socket
import subprocess
import sys


def free_port() -> int:
    """A port nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def listening(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0


def stop_group(proc: subprocess.Popen) -> None:
    """SIGTERM the server's process group, then SIGKILL what is left of it (workers outlive their parent).

    Not probed with signal 0: orphaned workers can stay zombies here, where PID 1 does not reap them.
    """
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=20)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def start_server(cmd: list[str], log, env: dict) -> subprocess.Popen:
    """A server in its own process group (its workers die with the group, see `stop_group`), output to `log`."""
    with open(log, "w") as out:
        return subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)


def wait_healthy(url: str, proc: subprocess.Popen, log, timeout: float = 120) -> float:
    """Wait until GET `url` answers 200; return the seconds waited. Fails early when the server exits."""
    import time
    from pathlib import Path

    import httpx

    start = time.monotonic()
    while time.monotonic() - start < timeout:
        assert proc.poll() is None, f"{url}: server exited\n{Path(log).read_text()[-3000:]}"
        try:
            if httpx.get(url, timeout=5).status_code == 200:
                return time.monotonic() - start
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    raise AssertionError(f"{url}: not healthy after {timeout} s\n{Path(log).read_text()[-3000:]}")


def hold_pipeline_lock(project) -> subprocess.Popen:
    """Another process holding the project's pipeline lock (as a running pipeline does) until it is killed."""
    holder = subprocess.Popen([sys.executable, "-c", "import time\nfrom morer1.orchestrate import pipeline_lock\n"
                               f"with pipeline_lock({str(project)!r}):\n    print('held', flush=True)\n"
                               "    time.sleep(600)\n"], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    return holder
