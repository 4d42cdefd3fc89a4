"""OAuth scopes of the gateway and which MCP methods need which."""

from __future__ import annotations

TOOLS = "mcp:tools"
RESOURCES = "mcp:resources"
PROMPTS = "mcp:prompts"
ADMIN = "admin"
GATEWAY = "gateway"

SCOPES: dict[str, str] = {
    TOOLS: "List and call tools",
    RESOURCES: "List, read and subscribe to resources",
    PROMPTS: "List and get prompts",
    ADMIN: "Administer the gateway (REST API)",
    GATEWAY: "Act as a peer gateway: forward calls on behalf of your own users",
}
MCP_SCOPES = (TOOLS, RESOURCES, PROMPTS)
"""What an MCP host asks for by default (advertised in WWW-Authenticate)."""
STAFF_ONLY_SCOPES = frozenset({ADMIN})
"""Scopes a token carries only while it acts for an active staff user."""
TRUSTED_GATEWAY_SCOPES = frozenset({GATEWAY, *MCP_SCOPES})
"""All a trusted peer gateway's own token may carry (docs/IDENTITY.md, "Trust between gateways")."""


def allowed_scopes(*, staff_user: bool, trusted_gateway: bool) -> frozenset[str]:
    """Return the scopes a token may carry: the one rule, at issuance and at every use.

    `staff_user`: the token acts for a user who is active and staff *now*; a token without a
    user (client credentials) never does. `trusted_gateway`: the token's client is a peer
    gateway this one trusts (`manage.py gateway trust`), which gets what peer gateways need.
    """
    if trusted_gateway:
        return TRUSTED_GATEWAY_SCOPES
    if staff_user:
        return frozenset(SCOPES)
    return frozenset(SCOPES) - STAFF_ONLY_SCOPES

# Tasks come only from tools/call, so reading or cancelling one is a tool use.
_BY_PREFIX = (("tools/", TOOLS), ("tasks/", TOOLS), ("resources/", RESOURCES), ("prompts/", PROMPTS))


def required_scope(method: str, params: object = None) -> str | None:
    """Return the scope an MCP method needs, or None if any valid token may call it."""
    for prefix, scope in _BY_PREFIX:
        if method.startswith(prefix):
            return scope
    if method == "completion/complete":
        ref = params.get("ref") if isinstance(params, dict) else None
        kind = ref.get("type") if isinstance(ref, dict) else None
        return RESOURCES if kind == "ref/resource" else PROMPTS
    return None
