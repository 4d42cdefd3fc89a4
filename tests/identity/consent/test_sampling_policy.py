"""Consent kinds `sampling` and `elicitation`: the rule (no database) and what the page is shown.

The name a policy's `name_pattern` matches is the tool during whose call the upstream asks.
"""

from __future__ import annotations

import base64
from datetime import UTC, datetime

import pytest
from django.test import override_settings

from identity.consent.policy import decide
from identity.consent.upstream_requests import TEXT_LIMIT, request_summary
from identity.hostauth.tokens import Identity
from identity.models import ConsentPolicy

ALICE = Identity(token_id=1, user_id=1, username="alice", application_id=1, client_id="claude", scopes=frozenset(), expires=datetime(2100, 1, 1, tzinfo=UTC))
BOB = Identity(token_id=2, user_id=2, username="bob", application_id=2, client_id="cursor", scopes=frozenset(), expires=datetime(2100, 1, 1, tzinfo=UTC))


def policy(pk: int, decision: str, **fields: object) -> ConsentPolicy:
    return ConsentPolicy(pk=pk, decision=decision, **fields)


P = {
    "web-allow-any-kind": policy(1, "allow", peer="web"),
    "web-sampling-ask": policy(2, "ask", peer="web", kind="sampling"),
    "web-summarize-sampling-allow": policy(3, "allow", peer="web", kind="sampling", name_pattern="summarize*"),
    "alice-web-sampling-deny": policy(4, "deny", peer="web", kind="sampling", username="alice"),
    "sampling-deny-everywhere": policy(5, "deny", kind="sampling"),
    "web-elicitation-allow": policy(6, "allow", peer="web", kind="elicitation"),
    "any-deny": policy(7, "deny"),
    "web-sampling-allow-hi": policy(8, "allow", peer="web", kind="sampling", priority=5),
    "web-sampling-deny": policy(9, "deny", peer="web", kind="sampling"),
}

# (row id, policies, identity, peer, kind, name, extra kwargs, expected action, expected policy pk)
TABLE = [
    ("no policy: sampling asks by default", [], ALICE, "web", "sampling", "summarize", {}, "ask", None),
    ("no policy: elicitation asks by default", [], ALICE, "web", "elicitation", "signup", {}, "ask", None),
    ("explicit default allow", [], ALICE, "web", "sampling", "summarize", {"default": "allow"}, "allow", None),
    ("explicit default deny", [], ALICE, "web", "elicitation", "signup", {"default": "deny"}, "deny", None),
    ("a blank-kind policy governs calls, not sampling", ["web-allow-any-kind"], ALICE, "web", "sampling", "x", {}, "ask", None),
    ("a blank-kind deny leaves sampling to its default", ["any-deny"], ALICE, "web", "sampling", "x", {"default": "allow"}, "allow", None),
    ("a blank-kind policy still governs tools", ["web-allow-any-kind"], ALICE, "web", "tool", "x", {}, "allow", 1),
    ("a sampling policy does not govern tools", ["sampling-deny-everywhere"], ALICE, "web", "tool", "x", {"default": "allow"}, "allow", None),
    ("a sampling policy does not govern elicitation", ["web-sampling-ask"], ALICE, "web", "elicitation", "x", {"default": "allow"}, "allow", None),
    ("per peer", ["web-sampling-ask"], ALICE, "web", "sampling", "x", {"default": "allow"}, "ask", 2),
    ("other peer untouched", ["web-sampling-ask"], ALICE, "files", "sampling", "x", {"default": "allow"}, "allow", None),
    ("tool pattern beats peer-only", ["web-sampling-ask", "web-summarize-sampling-allow"], ALICE, "web", "sampling", "summarize_page", {}, "allow", 3),
    ("tool pattern does not match another tool", ["web-sampling-ask", "web-summarize-sampling-allow"], ALICE, "web", "sampling", "search", {}, "ask", 2),
    ("per user", ["web-sampling-ask", "alice-web-sampling-deny"], ALICE, "web", "sampling", "x", {}, "deny", 4),
    ("per user: someone else", ["web-sampling-ask", "alice-web-sampling-deny"], BOB, "web", "sampling", "x", {}, "ask", 2),
    ("kind-only policy matches every peer", ["sampling-deny-everywhere"], BOB, "files", "sampling", "x", {}, "deny", 5),
    ("elicitation policy", ["web-elicitation-allow", "sampling-deny-everywhere"], ALICE, "web", "elicitation", "signup", {}, "allow", 6),
    ("same specificity: priority wins", ["web-sampling-deny", "web-sampling-allow-hi"], ALICE, "web", "sampling", "x", {}, "allow", 8),
    ("same specificity and priority: deny wins", ["web-sampling-ask", "web-sampling-deny"], ALICE, "web", "sampling", "x", {}, "deny", 9),
]


@pytest.mark.parametrize(
    ("policies", "identity", "peer", "kind", "name", "extra", "action", "policy_id"),
    [row[1:] for row in TABLE],
    ids=[row[0] for row in TABLE],
)
def test_the_rule(
    policies: list[str], identity: Identity, peer: str, kind: str, name: str, extra: dict[str, object], action: str, policy_id: int | None
) -> None:
    with override_settings(FEDMCP_CONSENT_SAMPLING_DEFAULT="ask", FEDMCP_CONSENT_ELICITATION_DEFAULT="ask"):
        decision = decide(identity, peer, kind, name, policies=[P[p] for p in policies], **extra)  # type: ignore[arg-type]
    assert (decision.action, decision.policy_id) == (action, policy_id)


@pytest.mark.parametrize(("setting", "kind"), [("FEDMCP_CONSENT_SAMPLING_DEFAULT", "sampling"), ("FEDMCP_CONSENT_ELICITATION_DEFAULT", "elicitation")])
@pytest.mark.parametrize("value", ["allow", "ask", "deny"])
def test_each_kind_follows_its_own_default_setting(setting: str, kind: str, value: str) -> None:
    other = "FEDMCP_CONSENT_ELICITATION_DEFAULT" if kind == "sampling" else "FEDMCP_CONSENT_SAMPLING_DEFAULT"
    # The tools default and the other kind's default have no say.
    with override_settings(**{setting: value, other: "deny" if value != "deny" else "allow", "FEDMCP_CONSENT_DEFAULT": "allow"}):
        decision = decide(ALICE, "web", kind, "t")
    assert decision.action == value
    assert decision.policy_id is None


def test_the_summary_shows_each_message_and_the_sampling_parameters() -> None:
    params = {
        "messages": [
            {"role": "user", "content": {"type": "text", "text": "<b>Summarize</b> this"}},
            {
                "role": "assistant",
                "content": [{"type": "text", "text": "Sure."}, {"type": "image", "mimeType": "image/png", "data": base64.b64encode(b"x" * 300).decode()}],
            },
            {"role": "user", "content": {"type": "audio", "mimeType": "audio/wav", "data": "AAAA"}},
        ],
        "systemPrompt": "You are terse.",
        "maxTokens": 120,
        "modelPreferences": {"hints": [{"name": "claude-3"}], "costPriority": 0.2, "bogus": "dropped"},
        "temperature": 0.5,
    }

    summary = request_summary("sampling/createMessage", params)

    assert [m["role"] for m in summary["messages"]] == ["user", "assistant", "user"]
    assert summary["messages"][0]["content"] == [{"type": "text", "text": "<b>Summarize</b> this"}]
    image = summary["messages"][1]["content"][1]
    assert image["type"] == "image" and "image/png" in image["note"] and "300 bytes" in image["note"]
    assert "data" not in image
    assert summary["messages"][2]["content"][0]["type"] == "audio"
    assert (summary["systemPrompt"], summary["maxTokens"], summary["temperature"]) == ("You are terse.", 120, 0.5)
    assert summary["modelPreferences"] == {"hints": ["claude-3"], "costPriority": 0.2}


def test_the_summary_bounds_long_text_and_survives_junk() -> None:
    long = "a" * (TEXT_LIMIT + 500)
    messages = [{"role": "user", "content": {"type": "text", "text": long}}, "junk", {"content": 5}]
    summary = request_summary("sampling/createMessage", {"messages": messages, "maxTokens": "many"})

    kept = summary["messages"][0]["content"][0]["text"]
    assert kept.startswith("a" * TEXT_LIMIT) and "500 more characters not kept" in kept
    assert summary["messages"][1]["role"] == "?" and summary["messages"][2]["content"][0]["type"] == "unknown"
    assert summary["maxTokens"] is None
    assert request_summary("sampling/createMessage", None)["messages"] == []


def test_the_summary_of_an_elicitation_shows_its_message_and_schema() -> None:
    schema = {"type": "object", "properties": {"email": {"type": "string"}}, "required": ["email"]}

    summary = request_summary("elicitation/create", {"message": "Your email, please", "requestedSchema": schema})

    assert (summary["method"], summary["mode"], summary["message"]) == ("elicitation/create", "form", "Your email, please")
    assert '"email"' in summary["requestedSchema"] and '"required"' in summary["requestedSchema"]
    url = request_summary("elicitation/create", {"mode": "url", "message": "Sign in", "url": "https://idp.example/x", "elicitationId": "1"})
    assert (url["mode"], url["url"], url["requestedSchema"]) == ("url", "https://idp.example/x", "")
