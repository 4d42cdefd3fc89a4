"""Start the gateway with two demo upstreams: the fixture server (HTTP) and mcp-server-time (stdio).

Used by `make demo`. The fixture server runs on PORT+1 on the same host and stops with the gateway.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable


def wait_for(url: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            urllib.request.urlopen(url, timeout=1)
            return
        except urllib.error.HTTPError:
            return  # Any HTTP answer means it is listening.
        except OSError:
            time.sleep(0.2)
    raise SystemExit(f"{url} did not come up within {timeout:g}s")


def _free_port() -> int:
    """A loopback port nothing listens on now (the demo upstream's: the gateway's port + 1 may be taken)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def manage(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([PY, "manage.py", *args], cwd=ROOT, text=True, capture_output=True)


def _stop_on_sigterm(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def main() -> None:
    signal.signal(signal.SIGTERM, _stop_on_sigterm)
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--fixture-port", type=int, default=0, help="the demo upstream's port (default: a free one)")
    options = parser.parse_args()
    fixture_port = options.fixture_port or _free_port()
    fixture = subprocess.Popen(
        [PY, "-m", "tests.fixtures.everything_server", "--port", str(fixture_port), "--name", "demo"], cwd=ROOT
    )
    try:
        wait_for(f"http://127.0.0.1:{fixture_port}/mcp")
        time_server = Path(PY).with_name("mcp-server-time")
        for name, args in (
            ("fixture", ["--url", f"http://127.0.0.1:{fixture_port}/mcp"]),
            ("time", ["--command", str(time_server)]),
        ):
            manage("peer", "remove", name)
            result = manage("peer", "add", name, *args)
            sys.stdout.write(result.stdout)
            sys.stderr.write(result.stderr)
        subprocess.run([PY, "manage.py", "bootstrap", "--host", options.host, "--port", str(options.port)], cwd=ROOT, check=True)
        resource = os.environ.get("FEDMCP_PUBLIC_URL") or f"http://{options.host}:{options.port}"
        token = manage("token", "--user", "demo", "--create-user", "--expires", "12h", "--resource", resource).stdout.strip()
        sys.stdout.write(
            f"  Demo token (12 h, user 'demo'):  export TOKEN={token}\n"
            f"  Sign in as 'demo' to answer its consent prompts: .venv/bin/python manage.py changepassword demo, then {resource}/consent/\n\n"
        )
        daphne = Path(PY).with_name("daphne")
        gateway = subprocess.Popen([str(daphne), "-b", options.host, "-p", str(options.port), "fedmcp_site.asgi:application"], cwd=ROOT)
        try:
            gateway.wait()
        except KeyboardInterrupt:
            gateway.terminate()
            gateway.wait(timeout=15)
    finally:
        fixture.terminate()
        fixture.wait(timeout=10)


if __name__ == "__main__":
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "fedmcp_site.settings")
    main()
