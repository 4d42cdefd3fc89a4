"""Run a command with the PostgreSQL and Redis the tests need, starting throwaway ones if necessary.

    python scripts/test_services.py [--dir build] -- COMMAND [ARGS...]

The tests use the PostgreSQL admin DSN in FEDMCP_E2E_POSTGRES (default
postgresql://postgres@127.0.0.1:5432/test, trust auth, may create databases) and the Redis in
FEDMCP_E2E_REDIS (default redis://127.0.0.1:6379/0). When they answer, COMMAND runs with them as
they are. When one does not, this script starts its own, for COMMAND only:

* PostgreSQL: `initdb --auth=trust` into DIR/pg, `postgres` on a free loopback port (as the
  `postgres` user when run as root: PostgreSQL refuses to run as root), and a `test` database;
* Redis: `redis-server --port PORT --save '' --dir DIR/redis` on a free loopback port;

exports their URLs to COMMAND in FEDMCP_E2E_POSTGRES / FEDMCP_E2E_REDIS, and stops them and
deletes their data when COMMAND ends (also on Ctrl-C or SIGTERM). Missing programs are installed
with `apt-get install -y postgresql redis-server` when running as root on Debian/Ubuntu; otherwise
the script says what to install and exits 2. The exit status is COMMAND's.

DIR defaults to FEDMCP_TEST_SERVICES_DIR, else `build` in the current directory.
"""

from __future__ import annotations

import argparse
import contextlib
import glob
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

DEFAULT_POSTGRES = "postgresql://postgres@127.0.0.1:5432/test"
DEFAULT_REDIS = "redis://127.0.0.1:6379/0"
START_TIMEOUT = 60.0
"""Seconds a started server has to accept connections."""
STOP_TIMEOUT = 30.0
"""Seconds a server has to exit after being asked to; then it is killed."""
APT_PACKAGES = ("postgresql", "redis-server")


def say(message: str) -> None:
    print(f"test services: {message}", file=sys.stderr, flush=True)


class ServiceError(Exception):
    """A service could not be provided; the message says why and what to do."""


# --- Probing ------------------------------------------------------------------------------------


def postgres_reachable(dsn: str) -> bool:
    """True if `dsn` accepts a connection and answers a query."""
    try:
        import psycopg
    except ImportError:  # no driver: probe the port only
        return port_open(urlsplit(dsn).hostname or "127.0.0.1", urlsplit(dsn).port or 5432)
    try:
        with psycopg.connect(dsn, connect_timeout=3) as conn:
            conn.execute("SELECT 1")
        return True
    except psycopg.Error:
        return False


def redis_reachable(url: str) -> bool:
    """True if `url` answers PING."""
    try:
        import redis
    except ImportError:
        return port_open(urlsplit(url).hostname or "127.0.0.1", urlsplit(url).port or 6379)
    client = redis.Redis.from_url(url, socket_connect_timeout=3, socket_timeout=3)
    try:
        return bool(client.ping())
    except redis.RedisError:
        return False
    finally:
        client.close()


def port_open(host: str, port: int) -> bool:
    with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=1):
        return True
    return False


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# --- Programs -----------------------------------------------------------------------------------


def postgres_bin_dir() -> Path | None:
    """The directory holding initdb and postgres: Debian's newest /usr/lib/postgresql/N/bin, or PATH."""
    debian = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(Path(p).parts[4]) if Path(p).parts[4].isdigit() else 0)
    if debian:
        return Path(debian[-1]).parent
    initdb = shutil.which("initdb")
    return Path(initdb).parent if initdb and shutil.which("postgres") else None


def redis_server() -> str | None:
    return shutil.which("redis-server") or (os.access("/usr/bin/redis-server", os.X_OK) and "/usr/bin/redis-server") or None


def ensure_programs(need_postgres: bool, need_redis: bool) -> None:
    """Install the Debian packages that provide the missing programs, or say what to install."""
    missing = []
    if need_postgres and postgres_bin_dir() is None:
        missing.append("postgresql")
    if need_redis and redis_server() is None:
        missing.append("redis-server")
    if not missing:
        return
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        raise ServiceError(
            f"{' and '.join(missing)} not installed and not reachable; install them "
            f"(Debian/Ubuntu: sudo apt-get install -y {' '.join(missing)}) or point "
            "FEDMCP_E2E_POSTGRES / FEDMCP_E2E_REDIS at running servers"
        )
    say(f"installing {' '.join(missing)} (apt-get)")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    subprocess.run(["apt-get", "update", "-qq"], check=True, env=env)
    # policy-rc.d-less containers may try to start the packaged services; that is harmless.
    subprocess.run(["apt-get", "install", "-y", "-qq", *missing], check=True, env=env)
    if (need_postgres and postgres_bin_dir() is None) or (need_redis and redis_server() is None):
        raise ServiceError(f"apt-get installed {' '.join(missing)} but the programs are still not found")


# --- Servers ------------------------------------------------------------------------------------


@contextlib.contextmanager
def _signals_held() -> Iterator[None]:
    """Hold SIGTERM, SIGHUP and SIGINT back while a server process is started and registered.

    They are delivered (and `main`'s handler raises) once the block is done, so no signal can
    fall between the process starting and its being known to the cleanup.
    """
    held = {signal.SIGTERM, signal.SIGHUP, signal.SIGINT}
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, held)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


@dataclass
class Server:
    name: str
    url: str
    process: subprocess.Popen
    data_dir: Path
    log: Path

    def stop(self, sig: int) -> None:
        if self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.process.send_signal(sig)
            try:
                self.process.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                say(f"{self.name} did not stop within {STOP_TIMEOUT:.0f}s; killing it")
                self.process.kill()
                self.process.wait()
        shutil.rmtree(self.data_dir, ignore_errors=True)


def _run_as() -> tuple[str, str] | None:
    """The (user, group) to run PostgreSQL as: None when not root, else `postgres` (or `nobody`)."""
    if os.geteuid() != 0:
        return None
    for user in ("postgres", "nobody"):
        with contextlib.suppress(KeyError):
            entry = pwd.getpwnam(user)
            import grp

            return user, grp.getgrgid(entry.pw_gid).gr_name
    raise ServiceError("running as root and there is no `postgres` or `nobody` user to run PostgreSQL as")


def _reachable_by(user: str, path: Path) -> bool:
    """True if `user` can enter `path` (every parent must be searchable)."""
    return subprocess.run(["runuser", "-u", user, "--", "test", "-x", str(path)], capture_output=True, check=False).returncode == 0


def _wait_until(check, what: str, process: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    while not check():
        if process.poll() is not None:
            raise ServiceError(f"{what} exited with status {process.returncode}:\n{_tail(log)}")
        if time.monotonic() > deadline:
            raise ServiceError(f"{what} did not accept connections within {START_TIMEOUT:.0f}s:\n{_tail(log)}")
        time.sleep(0.2)


def _tail(log: Path, lines: int = 20) -> str:
    with contextlib.suppress(OSError):
        return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])
    return "(no log)"


def start_postgres(base: Path, register: Callable[[Server], None]) -> Server:
    """Start PostgreSQL; `register` learns of the server as soon as its process exists (to stop it whatever happens)."""
    bin_dir = postgres_bin_dir()
    assert bin_dir is not None
    run_as = _run_as()
    data_dir = base / "pg"
    shutil.rmtree(data_dir, ignore_errors=True)
    data_dir.mkdir(parents=True)
    if run_as is not None:
        shutil.chown(data_dir, *run_as)
        if not _reachable_by(run_as[0], data_dir):
            # A parent (a home directory, pytest's tmp) is closed to that user: use /tmp instead.
            data_dir.rmdir()
            data_dir = Path(tempfile.mkdtemp(prefix="fedmcp-test-pg-"))
            shutil.chown(data_dir, *run_as)
    log = base / "pg.log"
    user_args = {"user": run_as[0], "group": run_as[1], "extra_groups": []} if run_as else {}
    with open(log, "wb") as out:
        initdb = subprocess.run(
            [str(bin_dir / "initdb"), "-D", str(data_dir / "data"), "-U", "postgres", "--auth=trust", "--no-sync", "-E", "UTF8", "--locale=C"],
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd="/",
            check=False,
            **user_args,
        )
    if initdb.returncode != 0:
        raise ServiceError(f"initdb failed:\n{_tail(log)}")
    port = free_port()
    out = open(log, "ab")  # noqa: SIM115 - the server writes to it; closed here once it has it
    with _signals_held():
        process = subprocess.Popen(
            [
                str(bin_dir / "postgres"), "-D", str(data_dir / "data"), "-k", str(data_dir), "-h", "127.0.0.1", "-p", str(port),
                # Throwaway data: durability buys nothing, and the tests run faster without it.
                "-c", "fsync=off", "-c", "synchronous_commit=off", "-c", "full_page_writes=off",
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd="/",
            start_new_session=True,  # Ctrl-C reaches the tests, not the server: it is stopped in order
            **user_args,
        )
        server = Server("PostgreSQL", f"postgresql://postgres@127.0.0.1:{port}/test", process, data_dir, log)
        register(server)
    out.close()
    admin = f"postgresql://postgres@127.0.0.1:{port}/postgres"
    _wait_until(lambda: postgres_reachable(admin), f"PostgreSQL ({bin_dir})", process, log)
    import psycopg

    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute("CREATE DATABASE test")
    say(f"started PostgreSQL ({bin_dir.parent.name}) on 127.0.0.1:{port}, pid {process.pid}, data in {data_dir}")
    return server


def start_redis(base: Path, register: Callable[[Server], None]) -> Server:
    """Start redis-server; `register` as for `start_postgres`."""
    program = redis_server()
    assert program is not None
    data_dir = base / "redis"
    shutil.rmtree(data_dir, ignore_errors=True)
    data_dir.mkdir(parents=True)
    port = free_port()
    log = base / "redis.log"
    out = open(log, "wb")  # noqa: SIM115 - as above
    url = f"redis://127.0.0.1:{port}/0"
    with _signals_held():
        process = subprocess.Popen(
            [program, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--dir", str(data_dir)],
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        server = Server("Redis", url, process, data_dir, log)
        register(server)
    out.close()
    _wait_until(lambda: redis_reachable(url), "redis-server", process, log)
    say(f"started Redis on 127.0.0.1:{port}, pid {process.pid}")
    return server


@contextlib.contextmanager
def services(base: Path) -> Iterator[dict[str, str]]:
    """Yield the environment for the tests; stop whatever was started on the way out."""
    postgres = os.environ.get("FEDMCP_E2E_POSTGRES") or DEFAULT_POSTGRES
    redis_url = os.environ.get("FEDMCP_E2E_REDIS") or DEFAULT_REDIS
    need_postgres = not postgres_reachable(postgres)
    need_redis = not redis_reachable(redis_url)
    env = {"FEDMCP_E2E_POSTGRES": postgres, "FEDMCP_E2E_REDIS": redis_url}
    started: list[tuple[Server, int]] = []
    try:
        if need_postgres or need_redis:
            say(
                "not reachable: "
                + ", ".join(u for u, n in ((postgres, need_postgres), (redis_url, need_redis)) if n)
                + f"; starting throwaway servers under {base}"
            )
            base.mkdir(parents=True, exist_ok=True)
            ensure_programs(need_postgres, need_redis)
        # Each server is registered for stopping the moment its process exists, so a SIGTERM that
        # arrives while it starts (or just after it said so) still stops it.
        if need_postgres:
            server = start_postgres(base, lambda s: started.append((s, signal.SIGINT)))  # SIGINT: PostgreSQL's "fast" shutdown
            env["FEDMCP_E2E_POSTGRES"] = server.url
        if need_redis:
            server = start_redis(base, lambda s: started.append((s, signal.SIGTERM)))
            env["FEDMCP_E2E_REDIS"] = server.url
        yield env
    finally:
        for server, sig in reversed(started):
            server.stop(sig)
            say(f"stopped {server.name} (pid {server.process.pid})")


class _Terminated(Exception):
    pass


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dir", default=os.environ.get("FEDMCP_TEST_SERVICES_DIR") or "build", help="where throwaway servers keep their data and logs")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="the command to run (after --)")
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("no command given (usage: test_services.py -- COMMAND ...)")

    def on_term(signum, frame):
        raise _Terminated(signum)

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGHUP, on_term)
    try:
        with services(Path(args.dir).resolve()) as env:
            return run(command, {**os.environ, **env})
    except ServiceError as exc:
        say(f"error: {exc}")
        return 2
    except _Terminated as exc:
        return 128 + exc.args[0]
    except KeyboardInterrupt:
        return 130


def run(command: list[str], env: dict[str, str]) -> int:
    """Run `command` to its end; pass SIGTERM/SIGHUP on to it and wait for it before returning."""
    child = subprocess.Popen(command, env=env)
    while True:
        try:
            return child.wait()
        except KeyboardInterrupt:
            # The terminal sent SIGINT to the command too: let it finish, then the servers stop.
            continue
        except _Terminated as exc:
            child.send_signal(exc.args[0])
            with contextlib.suppress(subprocess.TimeoutExpired):
                child.wait(STOP_TIMEOUT)
            raise

if __name__ == "__main__":
    sys.exit(main())
