"""/consent/ws: pushes a signed-in user's new and answered consent prompts to their open pages.

Session-authenticated (channels.auth.AuthMiddlewareStack) behind an Origin check
(AllowedHostsOriginValidator); see `consent_websocket` in fedmcp_site/asgi.py. It only
pushes: answers go through the CSRF-protected POST forms.
"""

from __future__ import annotations

from typing import Any

from channels.auth import AuthMiddlewareStack
from channels.generic.websocket import AsyncJsonWebsocketConsumer
from channels.security.websocket import AllowedHostsOriginValidator

from identity.consent import user_group

WS_POLICY_VIOLATION = 1008


class ConsentPromptConsumer(AsyncJsonWebsocketConsumer):
    group = ""

    async def connect(self) -> None:
        user = self.scope.get("user")
        if user is None or not user.is_authenticated:
            await self.close(code=WS_POLICY_VIOLATION)
            return
        self.group = user_group(user.pk)
        await self.channel_layer.group_add(self.group, self.channel_name)
        await self.accept()

    async def disconnect(self, code: int) -> None:
        if self.group:
            await self.channel_layer.group_discard(self.group, self.channel_name)

    async def receive_json(self, content: Any, **kwargs: Any) -> None:
        """Ignore anything the page sends."""

    async def consent_prompt(self, event: dict[str, Any]) -> None:
        await self.send_json({"type": "prompt", "prompt": event["prompt"]})

    async def consent_decided(self, event: dict[str, Any]) -> None:
        await self.send_json({"type": "decided", "id": event["id"], "status": event["status"]})


def consent_websocket() -> Any:
    """The ASGI app for /consent/ws: Origin check, then session auth, then the consumer."""
    return AllowedHostsOriginValidator(AuthMiddlewareStack(ConsentPromptConsumer.as_asgi()))
