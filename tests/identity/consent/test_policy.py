"""`identity.consent.policy.decide`: the consent rule as a table (no database), and argument redaction.

Rows that rely on the default pass it explicitly: tests/conftest.py sets FEDMCP_CONSENT_DEFAULT
to "allow" for every test.
"""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from identity.consent.policy import decide, redact
from identity.hostauth.tokens import Identity
from identity.models import ConsentPolicy

ALICE = Identity(token_id=1, user_id=1, username="alice", application_id=1, client_id="claude", scopes=frozenset(), expires=datetime(2100, 1, 1, tzinfo=UTC))
BOB = Identity(token_id=2, user_id=2, username="bob", application_id=2, client_id="cursor", scopes=frozenset(), expires=datetime(2100, 1, 1, tzinfo=UTC))
REMOTE = Identity(
    token_id=3, user_id=None, username="", application_id=3, client_id="peer-gw", scopes=frozenset(), expires=datetime(2100, 1, 1, tzinfo=UTC),
    federated_issuer="https://eu.example", federated_subject="carol", via=("eu",),
)
ENGINEERS = 7


def policy(pk: int, decision: str, **fields: object) -> ConsentPolicy:
    return ConsentPolicy(pk=pk, decision=decision, **fields)


P = {
    "any-tool-allow": policy(1, "allow"),
    "github-ask": policy(2, "ask", peer="github"),
    "github-delete-deny": policy(3, "deny", peer="github", name_pattern="delete_*"),
    "alice-github-delete-allow": policy(4, "allow", peer="github", name_pattern="delete_*", username="alice"),
    "github-ask-hi": policy(5, "ask", peer="github", priority=10),
    "github-allow": policy(6, "allow", peer="github"),
    "github-deny": policy(7, "deny", peer="github"),
    "engineers-shell-allow": policy(8, "allow", peer="shell", group_id=ENGINEERS),
    "shell-deny": policy(9, "deny", peer="shell"),
    "eu-carol-deny": policy(10, "deny", federated_issuer="https://eu.example", federated_subject="carol"),
    "claude-ask": policy(11, "ask", client_id="claude"),
    "resources-deny": policy(12, "deny", kind="resource", name_pattern="file:///secret/*"),
    "disabled-deny": policy(13, "deny", enabled=False),
}

# (row id, policies, identity, peer, kind, name, extra kwargs, expected action, expected policy pk)
TABLE = [
    ("no policy, tool, new peer: ask", [], ALICE, "github", "tool", "search", {"default": "ask-new-peers"}, "ask", None),
    ("no policy, tool, used peer: allow", [], ALICE, "github", "tool", "search", {"default": "ask-new-peers", "peer_used": True}, "allow", None),
    ("no policy, resource: allow", [], ALICE, "github", "resource", "file:///a", {}, "allow", None),
    ("no policy, prompt: allow", [], ALICE, "github", "prompt", "p", {}, "allow", None),
    ("default deny", [], ALICE, "github", "tool", "search", {"default": "deny"}, "deny", None),
    ("default allow", [], ALICE, "github", "tool", "search", {"default": "allow"}, "allow", None),
    ("default ask even on used peer", [], ALICE, "github", "tool", "search", {"default": "ask", "peer_used": True}, "ask", None),
    ("more specific wins over broad", ["any-tool-allow", "github-ask"], ALICE, "github", "tool", "x", {}, "ask", 2),
    ("pattern more specific than peer only", ["github-ask", "github-delete-deny"], ALICE, "github", "tool", "delete_repo", {}, "deny", 3),
    ("pattern does not match", ["github-ask", "github-delete-deny"], ALICE, "github", "tool", "list_repos", {}, "ask", 2),
    ("user-specific allow beats pattern deny", ["github-delete-deny", "alice-github-delete-allow"], ALICE, "github", "tool", "delete_repo", {}, "allow", 4),
    ("user-specific policy ignores others", ["github-delete-deny", "alice-github-delete-allow"], BOB, "github", "tool", "delete_repo", {}, "deny", 3),
    ("same specificity: priority wins", ["github-ask-hi", "github-deny"], ALICE, "github", "tool", "x", {}, "ask", 5),
    ("tie: deny beats ask beats allow", ["github-allow", "github-ask", "github-deny"], ALICE, "github", "tool", "x", {}, "deny", 7),
    ("tie: ask beats allow", ["github-allow", "github-ask"], ALICE, "github", "tool", "x", {}, "ask", 2),
    ("group member allowed", ["engineers-shell-allow", "shell-deny"], ALICE, "shell", "tool", "run", {"groups": frozenset({ENGINEERS})}, "allow", 8),
    ("non-member denied", ["engineers-shell-allow", "shell-deny"], ALICE, "shell", "tool", "run", {}, "deny", 9),
    ("federated identity matched", ["eu-carol-deny", "any-tool-allow"], REMOTE, "github", "tool", "x", {}, "deny", 10),
    ("federated policy ignores local users", ["eu-carol-deny", "any-tool-allow"], ALICE, "github", "tool", "x", {}, "allow", 1),
    ("client application matched", ["claude-ask", "any-tool-allow"], ALICE, "github", "tool", "x", {}, "ask", 11),
    ("client application not matched", ["claude-ask", "any-tool-allow"], BOB, "github", "tool", "x", {}, "allow", 1),
    ("resource kind and uri pattern", ["resources-deny"], ALICE, "fs", "resource", "file:///secret/key", {}, "deny", 12),
    ("kind must match", ["resources-deny"], ALICE, "fs", "tool", "file:///secret/key", {"peer_used": True}, "allow", None),
    ("disabled policy ignored", ["disabled-deny"], ALICE, "github", "tool", "x", {"peer_used": True}, "allow", None),
    ("anonymous caller: no user policy applies", ["alice-github-delete-allow", "github-delete-deny"], None, "github", "tool", "delete_x", {}, "deny", 3),
]


@pytest.mark.parametrize(
    ("row", "names", "identity", "peer", "kind", "name", "extra", "action", "policy_pk"), TABLE, ids=[r[0] for r in TABLE]
)
def test_decide(
    row: str, names: list[str], identity: Identity | None, peer: str, kind: str, name: str, extra: dict, action: str, policy_pk: int | None
) -> None:
    decision = decide(identity, peer, kind, name, policies=[P[n] for n in names], **extra)
    assert (decision.action, decision.policy_id) == (action, policy_pk)


def test_order_of_policies_does_not_matter() -> None:
    names = ["github-allow", "github-ask", "github-deny", "any-tool-allow"]
    results = {decide(ALICE, "github", "tool", "x", policies=[P[n] for n in order]).policy_id for order in (names, names[::-1])}
    assert results == {7}


def test_redact_fields_union_of_matching_policies() -> None:
    broad = policy(20, "ask", redact_fields=["password"])
    narrow = policy(21, "ask", peer="db", redact_fields=["token"])
    other = policy(22, "ask", peer="mail", redact_fields=["body"])
    decision = decide(ALICE, "db", "tool", "q", policies=[broad, narrow, other])
    assert decision.redact_fields == ("password", "token")


def test_redact_nested() -> None:
    args = {"user": "a", "password": "p", "opts": {"token": "t", "list": [{"password": "q"}]}}
    assert redact(args, ["password", "token"]) == {
        "user": "a", "password": "[redacted]", "opts": {"token": "[redacted]", "list": [{"password": "[redacted]"}]},
    }
