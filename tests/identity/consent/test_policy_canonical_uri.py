"""Resource policies match URIs in their canonical form (issue 15, finding 1), whoever spelled them."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from identity.consent.policy import decide
from identity.hostauth.tokens import Identity
from identity.models import ConsentPolicy

ALICE = Identity(token_id=1, user_id=1, username="alice", application_id=1, client_id="claude", scopes=frozenset(), expires=datetime(2100, 1, 1, tzinfo=UTC))


@pytest.mark.parametrize(
    ("pattern", "name", "action"),
    [
        ("test://template/42/data", "test://template/4%32/data", "deny"),
        ("test://template/42/data", "TEST://Template/./42/data", "deny"),
        ("TEST://template/4%32/*", "test://template/42/data", "deny"),  # the pattern is canonical too
        ("file:///secret/*", "file:///public/../secret/key", "deny"),
        ("test://template/42/data", "test://template/43/data", "allow"),
        ("test://template/a%2Fb", "test://template/a/b", "allow"),  # %2F is not a path separator
    ],
)
def test_a_resource_policy_matches_every_spelling_of_its_uri(pattern: str, name: str, action: str) -> None:
    policy = ConsentPolicy(pk=1, decision="deny", peer="everything", kind="resource", name_pattern=pattern)
    assert decide(ALICE, "everything", "resource", name, policies=[policy]).action == action


def test_tool_names_are_not_rewritten() -> None:
    policy = ConsentPolicy(pk=1, decision="deny", peer="everything", kind="tool", name_pattern="4%32")
    assert decide(ALICE, "everything", "tool", "42", policies=[policy], default="allow").action == "allow"
