"""The method table: which MCP methods exist in which era, and the capabilities that follows.

Who answers each method is `handlers.HANDLERS`; the dispatcher joins the two (`dispatcher.METHODS`).
"""

from __future__ import annotations

from fedmcp_lib.json_types import JsonDict

LEGACY = frozenset({"legacy"})
MODERN = frozenset({"modern"})
BOTH = LEGACY | MODERN

ERAS: dict[str, frozenset[str]] = {
    "initialize": LEGACY,
    "ping": LEGACY,
    "logging/setLevel": LEGACY,
    "resources/subscribe": LEGACY,
    "resources/unsubscribe": LEGACY,
    "server/discover": MODERN,
    "subscriptions/listen": MODERN,
    "tools/list": BOTH,
    "tools/call": BOTH,
    "resources/list": BOTH,
    "resources/templates/list": BOTH,
    "resources/read": BOTH,
    "prompts/list": BOTH,
    "prompts/get": BOTH,
    "completion/complete": BOTH,
    # Tasks (mcp_endpoint/tasks.py): the 2026-07-28 extension and 2025-11-25's experimental ones.
    "tasks/get": BOTH,
    "tasks/cancel": BOTH,
    "tasks/update": MODERN,
    "tasks/result": LEGACY,
    "tasks/list": LEGACY,
}


def offers(method: str, era: str) -> bool:
    return era in ERAS.get(method, ())


def capabilities(era: str) -> JsonDict:
    """The server capabilities the table gives an era: a capability for each group of methods it serves.

    Lists change (`listChanged`) whenever peers or their catalogs do; resource updates are
    subscribed to with resources/subscribe (handshake era) or subscriptions/listen (2026-07-28).
    """
    offered: JsonDict = {}
    if offers("tools/list", era):
        offered["tools"] = {"listChanged": True}
    if offers("resources/list", era):
        watchable = offers("resources/subscribe", era) or offers("subscriptions/listen", era)
        offered["resources"] = {"subscribe": watchable, "listChanged": True}
    if offers("prompts/list", era):
        offered["prompts"] = {"listChanged": True}
    if offers("completion/complete", era):
        offered["completions"] = {}
    if offers("logging/setLevel", era):
        offered["logging"] = {}
    return offered
