"""Namespaced names on the aggregated endpoints: `<peer>__<name>` and `fedmcp://<peer>/<uri>`."""

from __future__ import annotations

import pytest

from federation import naming


def test_it_qualifies_and_splits_a_tool_name() -> None:
    qualified = naming.qualify_name("time", "get_current_time")

    assert qualified == "time__get_current_time"
    assert naming.split_name(qualified) == ("time", "get_current_time")


def test_the_first_separator_ends_the_peer_name() -> None:
    # Upstream names may contain "__" themselves; peer names never do.
    assert naming.split_name("github-enterprise__list__repos") == ("github-enterprise", "list__repos")


@pytest.mark.parametrize(
    "qualified",
    [
        "plain_name",  # no separator
        "time__",  # nothing after it
        "__tool",  # nothing before it
        "Time__tool",  # upper case is not a peer name
        "my_peer__tool",  # "_" is not allowed in peer names
        "a--b__tool",  # nor are double hyphens
        "-a__tool",
        "a/b__tool",
        "alpha\n__tool",  # "$" in the peer pattern would accept the trailing newline
    ],
)
def test_it_refuses_names_that_do_not_start_with_a_peer(qualified: str) -> None:
    assert naming.split_name(qualified) is None


def test_it_qualifies_and_splits_a_resource_uri_verbatim() -> None:
    qualified = naming.qualify_uri("files", "file:///srv/data/a.txt?x=1#top")

    assert qualified == "fedmcp://files/file:///srv/data/a.txt?x=1#top"
    assert naming.split_uri(qualified) == ("files", "file:///srv/data/a.txt?x=1#top")


def test_a_uri_template_survives_qualification() -> None:
    qualified = naming.qualify_uri("everything", "test://template/{id}/data")

    assert naming.split_uri(qualified) == ("everything", "test://template/{id}/data")


@pytest.mark.parametrize(
    "qualified",
    [
        "test://static-text",  # not ours
        "fedmcp://files",  # no upstream URI
        "fedmcp://files/",  # empty upstream URI
        "fedmcp:///file:///x",  # empty peer
        "fedmcp://Files/x",
        "fedmcp://files\n/x",
        "FEDMCP://files/x",
    ],
)
def test_it_refuses_uris_that_do_not_name_a_peer(qualified: str) -> None:
    assert naming.split_uri(qualified) is None


@pytest.mark.parametrize("peer", ["a", "time", "github-enterprise", "v2-api-1"])
def test_every_valid_peer_name_round_trips(peer: str) -> None:
    assert naming.split_name(naming.qualify_name(peer, "x__y")) == (peer, "x__y")
    assert naming.split_uri(naming.qualify_uri(peer, "a://b/c")) == (peer, "a://b/c")
