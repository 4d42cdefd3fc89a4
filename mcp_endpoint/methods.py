"""The method table: which MCP methods exist in which era, and who answers them."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from mcp_endpoint import handlers
from mcp_endpoint.context import HostContext

Handler = Callable[[HostContext, dict[str, Any]], Awaitable[dict[str, Any]]]

LEGACY = frozenset({"legacy"})
MODERN = frozenset({"modern"})
BOTH = LEGACY | MODERN


@dataclass(frozen=True)
class MethodSpec:
    handler: Handler
    eras: frozenset[str]


METHODS: dict[str, MethodSpec] = {
    "initialize": MethodSpec(handlers.initialize, LEGACY),
    "ping": MethodSpec(handlers.ping, LEGACY),
    "logging/setLevel": MethodSpec(handlers.set_level, LEGACY),
    "resources/subscribe": MethodSpec(handlers.resources_subscribe, LEGACY),
    "resources/unsubscribe": MethodSpec(handlers.resources_unsubscribe, LEGACY),
    "server/discover": MethodSpec(handlers.discover, MODERN),
    "subscriptions/listen": MethodSpec(handlers.subscriptions_listen, MODERN),
    "tools/list": MethodSpec(handlers.tools_list, BOTH),
    "tools/call": MethodSpec(handlers.tools_call, BOTH),
    "resources/list": MethodSpec(handlers.resources_list, BOTH),
    "resources/templates/list": MethodSpec(handlers.resource_templates_list, BOTH),
    "resources/read": MethodSpec(handlers.resources_read, BOTH),
    "prompts/list": MethodSpec(handlers.prompts_list, BOTH),
    "prompts/get": MethodSpec(handlers.prompts_get, BOTH),
    "completion/complete": MethodSpec(handlers.complete, BOTH),
}
