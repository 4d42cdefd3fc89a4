"""`manage.py peer add|list|remove`, as an operator types it."""

from __future__ import annotations

from io import StringIO

import pytest
from django.core.management import CommandError, call_command

from federation.models import CatalogEntry, CatalogKind, Peer, Transport
from tests.e2e.harness import free_port

URL = "http://127.0.0.1:8765/mcp"


def run(*args: str) -> tuple[str, str]:
    out, err = StringIO(), StringIO()
    call_command("peer", *args, stdout=out, stderr=err)
    return out.getvalue(), err.getvalue()


@pytest.mark.django_db
def test_add_with_no_sync_registers_the_peer_without_contacting_it() -> None:
    out, _ = run("add", "time", "--url", URL, "--no-sync", "--connect-timeout", "2.5", "--call-timeout", "30")

    peer = Peer.objects.get(name="time")
    assert (peer.transport, peer.url, peer.connect_timeout, peer.call_timeout) == (
        Transport.STREAMABLE_HTTP,
        URL,
        2.5,
        30.0,
    )
    assert peer.last_synced_at is None
    assert "Added peer time" in out


@pytest.mark.django_db
def test_add_a_stdio_peer_splits_its_command_line_and_keeps_its_env() -> None:
    run(
        "add",
        "clock",
        "--command",
        "mcp-server-time --local-timezone 'Europe/Paris'",
        "--env",
        "TZ=UTC",
        "--no-sync",
    )

    peer = Peer.objects.get(name="clock")
    assert (peer.transport, peer.command, peer.args, peer.env) == (
        Transport.STDIO,
        "mcp-server-time",
        ["--local-timezone", "Europe/Paris"],
        {"TZ": "UTC"},
    )


NAME_FIX = "lowercase letters, digits and single hyphens"


@pytest.mark.django_db
@pytest.mark.parametrize(
    ("name", "fix"),
    [
        ("Time", NAME_FIX),
        ("my_peer", NAME_FIX),
        ("a__b", NAME_FIX),  # "__" separates peer and tool names
        ("a--b", NAME_FIX),
        ("-time", NAME_FIX),
        ("time-", NAME_FIX),
        ("a/b", NAME_FIX),  # "/" separates peer and URI in fedmcp:// URIs
        ("a b", NAME_FIX),
        ("x" * 49, "at most 48 characters"),
        ("time\n", NAME_FIX),  # the pattern ends in \Z: "$" would match before the newline
    ],
)
def test_add_rejects_a_bad_name_and_says_how_to_fix_it(name: str, fix: str) -> None:
    with pytest.raises(CommandError) as raised:
        run("add", "--url", URL, "--no-sync", "--", name)

    assert fix in str(raised.value)
    assert not Peer.objects.exists()


@pytest.mark.django_db
def test_add_rejects_a_taken_name() -> None:
    run("add", "time", "--url", URL, "--no-sync")

    with pytest.raises(CommandError) as raised:
        run("add", "time", "--url", URL, "--no-sync")

    assert "name" in str(raised.value)
    assert Peer.objects.count() == 1


@pytest.mark.django_db
def test_add_rejects_an_env_pair_without_equals() -> None:
    with pytest.raises(CommandError) as raised:
        run("add", "clock", "--command", "mcp-server-time", "--env", "TZ", "--no-sync")

    assert "KEY=VALUE" in str(raised.value)


@pytest.mark.django_db(transaction=True)
def test_add_with_force_keeps_an_unreachable_peer_and_says_to_refresh_it() -> None:
    url = f"http://127.0.0.1:{free_port()}/mcp"  # bound and released: nothing listens

    _, err = run("add", "later", "--url", url, "--connect-timeout", "2", "--force")

    peer = Peer.objects.get(name="later")
    assert peer.last_error
    assert "manage.py peer refresh later" in err


@pytest.mark.django_db
def test_list_shows_each_peer_with_its_catalog_size() -> None:
    peer = Peer.objects.create(name="time", transport=Transport.STREAMABLE_HTTP, url=URL)
    CatalogEntry.objects.create(
        peer=peer, kind=CatalogKind.TOOL, upstream_name="now", payload={"name": "now"}
    )
    Peer.objects.create(name="off", transport=Transport.STREAMABLE_HTTP, url=URL, enabled=False)

    out, _ = run("list")

    lines = out.splitlines()
    assert len(lines) == 2
    assert lines[0].startswith("off") and "disabled" in lines[0]
    assert lines[1].startswith("time") and "tools=1" in lines[1] and URL in lines[1]


@pytest.mark.django_db
def test_list_without_peers_says_how_to_add_one() -> None:
    out, _ = run("list")

    assert "manage.py peer add" in out


@pytest.mark.django_db
def test_remove_deletes_the_peer_and_its_catalog() -> None:
    peer = Peer.objects.create(name="time", transport=Transport.STREAMABLE_HTTP, url=URL)
    CatalogEntry.objects.create(
        peer=peer, kind=CatalogKind.TOOL, upstream_name="now", payload={"name": "now"}
    )

    out, _ = run("remove", "time")

    assert not Peer.objects.exists()
    assert not CatalogEntry.objects.exists()
    assert "Removed peer time" in out


@pytest.mark.django_db
def test_remove_of_an_unknown_peer_points_to_the_list() -> None:
    with pytest.raises(CommandError) as raised:
        run("remove", "nobody")

    assert "manage.py peer list" in str(raised.value)
