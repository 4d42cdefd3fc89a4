"""/consent/ws: pushes a signed-in user's new and answered consent prompts to their open pages.

Session-authenticated (channels.auth.AuthMiddlewareStack) behind an Origin check: only the
gateway's own pages, same scheme, host and port (`SameOriginOnly`); see `consent_websocket`
in fedmcp_site/asgi.py. It only pushes: answers go through the CSRF-protected POST forms.
"""

from __future__ import annotations

import asyncio
from typing import Any

from channels.auth import AuthMiddlewareStack
from channels.db import database_sync_to_async
from channels.generic.websocket import AsyncJsonWebsocketConsumer
from channels.security.websocket import WebsocketDenier

from fedmcp_lib import security
from fedmcp_lib.layers import Memberships
from identity.consent.display import prompt_display
from identity.consent.prompts import user_group
from identity.models import ConsentPrompt

WS_POLICY_VIOLATION = 1008


class ConsentPromptConsumer(AsyncJsonWebsocketConsumer):
    memberships: Memberships | None = None
    _keeper: asyncio.Task[None] | None = None

    async def connect(self) -> None:
        user = self.scope.get("user")
        if user is None or not user.is_authenticated:
            await self.close(code=WS_POLICY_VIOLATION)
            return
        self.memberships = Memberships(self.channel_layer, self.channel_name, (user_group(user.pk),))
        await self.memberships.join()
        # A consent page may stay open for days: keep hearing the user's group past group_expiry.
        self._keeper = asyncio.create_task(self.memberships.keep())
        await self.accept()

    async def disconnect(self, code: int) -> None:
        if self._keeper is not None:
            self._keeper.cancel()
        if self.memberships is not None:
            await self.memberships.leave()

    async def receive_json(self, content: Any, **kwargs: Any) -> None:
        """Ignore anything the page sends."""

    async def consent_prompt(self, event: dict[str, Any]) -> None:
        summary = event["prompt"]
        await self.send_json({"type": "prompt", "prompt": {**summary, **await _display(summary["id"])}})

    async def consent_decided(self, event: dict[str, Any]) -> None:
        await self.send_json({"type": "decided", "id": event["id"], "status": event["status"]})


@database_sync_to_async
def _display(prompt_id: str) -> dict[str, Any]:
    """What the page shows besides the summary (identity/consent/display.py), as of now: the
    countdown starts from the seconds left when the page hears of the prompt."""
    prompt = ConsentPrompt.objects.filter(pk=prompt_id).first()
    return prompt_display(prompt) if prompt is not None else {}


class SameOriginOnly:
    """Refuse WebSocket handshakes that do not come from the gateway's own origin.

    Not channels' AllowedHostsOriginValidator, which compares the Origin's host name with
    ALLOWED_HOSTS and ignores scheme and port: a page on another port of the gateway's host
    could then open the feed with the user's cookie.
    """

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if security.same_origin_browser_request(scope):
            await self.app(scope, receive, send)
        else:
            await WebsocketDenier()(scope, receive, send)


def consent_websocket() -> Any:
    """The ASGI app for /consent/ws: Origin check, then session auth, then the consumer."""
    return SameOriginOnly(AuthMiddlewareStack(ConsentPromptConsumer.as_asgi()))
