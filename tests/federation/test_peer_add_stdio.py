"""`manage.py peer add NAME --command …` as the README shows it, on a machine as it comes.

* A bare program name is looked for where `pip install` put it (the gateway's virtualenv bin
  folder, often not on PATH), then on PATH.
* A peer whose first connection fails is not left behind (exit non-zero) unless `--force`;
  a child that exits says why (its stderr is shown), at once, not after the connect timeout.
* `npx`/`uvx` servers get longer for their first start (they download), and say so.
* The first sync is recorded as the peer's first health check.
"""

from __future__ import annotations

import shlex
import sys
from io import StringIO
from pathlib import Path

import pytest
from django.core.management import CommandError, call_command

from federation.models import Peer, PeerHealthCheck
from tests.e2e import harness

NOT_FOUND_404 = "npm error 404 Not Found - GET https://registry.npmjs.org/@example%2fno-such-server"
FAILING_CHILD = shlex.join([sys.executable, "-c", f"import sys; sys.stderr.write({NOT_FOUND_404!r} + '\\n'); sys.exit(1)"])


def run(*args: str) -> tuple[str, str]:
    out, err = StringIO(), StringIO()
    call_command("peer", *args, stdout=out, stderr=err)
    return out.getvalue(), err.getvalue()


@pytest.fixture
def bare_path(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """PATH without the virtualenv's bin folder, as in a shell that never activated it."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    monkeypatch.setenv("PATH", f"{bin_dir}:/usr/local/bin:/usr/bin:/bin")
    return bin_dir


@pytest.mark.django_db(transaction=True)
def test_the_readme_example_finds_the_program_in_the_virtualenv(bare_path: Path) -> None:
    assert (Path(sys.executable).parent / "mcp-server-time").exists()

    out, err = run("add", "time", "--command", "mcp-server-time --local-timezone UTC")

    assert "Synced time" in out, err
    peer = Peer.objects.get(name="time")
    assert peer.enabled and not peer.last_error
    assert peer.catalog.filter(upstream_name="get_current_time").exists()
    check = PeerHealthCheck.objects.get(peer=peer)
    assert check.ok and check.latency_ms is not None


@pytest.mark.django_db(transaction=True)
def test_a_missing_program_is_a_clear_error_and_leaves_no_peer(bare_path: Path) -> None:
    with pytest.raises(CommandError) as raised:
        run("add", "ghost", "--command", "no-such-mcp-server --flag")

    message = str(raised.value)
    assert "'no-such-mcp-server'" in message and "no such program" in message
    assert "uvx" in message and "npx" in message
    assert "--force" in message
    assert not Peer.objects.exists()


@pytest.mark.django_db(transaction=True)
def test_a_child_that_exits_shows_its_stderr_at_once_and_leaves_no_peer() -> None:
    err = StringIO()
    with pytest.raises(CommandError) as raised:
        # A connect timeout far longer than the test's own: had the exit gone unnoticed, the
        # command would wait it out and say the handshake timed out.
        call_command("peer", "add", "broken", "--command", FAILING_CHILD, "--connect-timeout", "250", stdout=StringIO(), stderr=err)

    assert "exited with code 1" in str(raised.value), "waited for the connect timeout instead of noticing the exit"
    assert NOT_FOUND_404 in err.getvalue()
    assert not Peer.objects.exists()


@pytest.mark.django_db(transaction=True)
def test_force_keeps_the_failing_peer_and_still_shows_why() -> None:
    _, err = run("add", "broken", "--command", FAILING_CHILD, "--force")

    assert NOT_FOUND_404 in err
    assert "manage.py peer refresh broken" in err
    peer = Peer.objects.get(name="broken")
    assert "exited with code 1" in peer.last_error
    assert not PeerHealthCheck.objects.get(peer=peer).ok


@pytest.mark.django_db(transaction=True)
def test_refresh_shows_the_childs_stderr_too() -> None:
    run("add", "broken", "--command", FAILING_CHILD, "--force")
    err = StringIO()

    with pytest.raises(CommandError):
        call_command("peer", "refresh", "broken", stdout=StringIO(), stderr=err)

    assert NOT_FOUND_404 in err.getvalue()


def _fake_launcher(bin_dir: Path, name: str, body: str) -> None:
    launcher = bin_dir / name
    launcher.write_text(f"#!/bin/sh\n{body}\n")
    launcher.chmod(0o755)


@pytest.mark.django_db(transaction=True)
def test_an_npx_server_gets_longer_for_its_first_start_and_says_why(bare_path: Path) -> None:
    fixture = shlex.join(harness.fixture_command(stdio=True, name="npxed"))
    _fake_launcher(bare_path, "npx", f"cd {shlex.quote(str(harness.ROOT))} && exec {fixture}")

    out, err = run("add", "npxed", "--command", "npx -y @example/server")

    assert "downloads the server the first time" in out and "120s" in out
    assert "Synced npxed" in out, err


@pytest.mark.django_db(transaction=True)
def test_an_npx_server_that_does_not_start_in_time_says_why(bare_path: Path) -> None:
    _fake_launcher(bare_path, "uvx", "sleep 30")

    with pytest.raises(CommandError) as raised:
        run("add", "slow", "--command", "uvx some-server", "--connect-timeout", "1")

    assert "within 1s" in str(raised.value)
    assert "uvx downloads the server the first time" in str(raised.value) and "--connect-timeout" in str(raised.value)
    assert not Peer.objects.exists()
