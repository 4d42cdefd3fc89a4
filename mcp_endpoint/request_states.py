"""The `requestState`s this gateway gives 2026-07-28 hosts, told apart from other gateways'.

When the gateway itself asks the host something (consent, an account to connect, held upstream
questions), it answers `input_required` with a signed state of its own. Each begins
`fedmcp-<kind>:<this gateway's name>:`. A peer gateway's state of the same kind, passed through
this one unchanged (the peer asked its own question), begins with the peer's name: it is that
upstream's state here and goes back to it with the host's retry, rather than being refused as a
forgery. Peered gateways have distinct names (FEDMCP_GATEWAY_NAME).
"""

from __future__ import annotations

from typing import Any

from django.conf import settings
from django.core import signing

from mcp_endpoint import jsonrpc

CONSENT = "consent"
"""The user's answer on /consent to a call this gateway asks about (mcp_endpoint/pipeline/decide.py)."""
HELD = "held"
"""Upstream input requests held until the user allowed them (pipeline/upstream_requests.py)."""
REMOTE_CONSENT = "remote-consent"
"""A peer gateway's consent question, asked here as the user's home (pipeline/home_consent.py)."""
CONNECT = "connect"
"""The user's own account at a peer, connected on this gateway's page (pipeline/connect.py)."""
BRIDGE = "bridge"
"""A handshake-era upstream's call held open while the host answers its requests (pipeline/held_calls.py)."""
CONTINUE = "continue"
"""A further round of an approved call (pipeline/continuation.py; signed and parsed there)."""


def prefix(kind: str) -> str:
    """How this gateway's states of `kind` begin."""
    return f"fedmcp-{kind}:{settings.FEDMCP_GATEWAY_NAME}:"


def is_ours(kind: str, state: Any) -> bool:
    return isinstance(state, str) and state.startswith(prefix(kind))


def issue(kind: str, data: Any, *, salt: str) -> str:
    """A signed state of `kind` carrying `data`."""
    return prefix(kind) + signing.dumps(data, salt=salt, compress=True)


def read(kind: str, state: str, *, salt: str, max_age: float) -> Any:
    """The data of one of this gateway's states of `kind` (`is_ours`).

    Raises:
        InvalidParamsError: the state was altered, signed for something else, or is too old.
    """
    try:
        return signing.loads(state.removeprefix(prefix(kind)), salt=salt, max_age=max_age)
    except signing.BadSignature as exc:
        raise jsonrpc.InvalidParamsError("requestState is not one this gateway issued") from exc
