"""Host sessions of the handshake era, kept in the database so any worker can serve them."""

from __future__ import annotations

import secrets
from datetime import timedelta

from django.conf import settings
from django.db import models
from django.utils import timezone


def new_session_id() -> str:
    """Return a session id: 256 random bits, visible ASCII only (the spec's requirement)."""
    return secrets.token_urlsafe(32)


class McpSessionQuerySet(models.QuerySet["McpSession"]):
    def live(self) -> McpSessionQuerySet:
        return self.filter(closed_at__isnull=True)

    def idle_since(self, seconds: int) -> McpSessionQuerySet:
        return self.live().filter(last_seen_at__lt=timezone.now() - timedelta(seconds=seconds))

    def lease_expired(self) -> McpSessionQuerySet:
        """Open connection-bound sessions whose worker stopped renewing them."""
        return self.live().filter(lease_until__lt=timezone.now())

    def unleased_idle_since(self, seconds: int) -> McpSessionQuerySet:
        """Open Streamable HTTP sessions nobody used for `seconds`."""
        return self.idle_since(seconds).filter(lease_until__isnull=True)

    def closed_before(self, seconds: int) -> McpSessionQuerySet:
        return self.filter(closed_at__lt=timezone.now() - timedelta(seconds=seconds))


class McpSession(models.Model):
    """One host session: created by `initialize` (or a WebSocket / SSE connection)."""

    TRANSPORTS = [("streamable-http", "Streamable HTTP"), ("websocket", "WebSocket"), ("sse", "HTTP+SSE")]

    id = models.CharField(primary_key=True, max_length=64, default=new_session_id, editable=False)
    transport = models.CharField(max_length=20, choices=TRANSPORTS)
    scope = models.CharField(max_length=48, blank=True, help_text="Peer name for a per-peer endpoint; blank for /mcp.")
    # The session belongs to the token's user and client: other credentials cannot use it.
    user = models.ForeignKey(settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.CASCADE, related_name="mcp_sessions")
    client_id = models.CharField(max_length=255, blank=True)
    protocol_version = models.CharField(max_length=20, blank=True)
    client_capabilities = models.JSONField(default=dict, blank=True)
    client_info = models.JSONField(default=dict, blank=True)
    log_level = models.CharField(max_length=12, blank=True)
    initialized = models.BooleanField(default=False)
    created_at = models.DateTimeField(auto_now_add=True)
    last_seen_at = models.DateTimeField(default=timezone.now)
    closed_at = models.DateTimeField(null=True, blank=True)
    lease_until = models.DateTimeField(
        null=True, blank=True,
        help_text="WebSocket and SSE sessions: open while the worker holding the connection renews this; blank for Streamable HTTP.",
    )

    objects = McpSessionQuerySet.as_manager()

    class Meta:
        indexes = [models.Index(fields=["closed_at", "last_seen_at"]), models.Index(fields=["closed_at", "lease_until"])]
        verbose_name = "MCP session"

    def __str__(self) -> str:
        return f"{self.transport} session {self.id[:8]}…"

    def belongs_to(self, user_id: int | None, client_id: str) -> bool:
        return self.user_id == user_id and self.client_id == client_id


class ResourceSubscription(models.Model):
    """A host session's `resources/subscribe`, by the URI the host used."""

    session = models.ForeignKey(McpSession, on_delete=models.CASCADE, related_name="subscriptions")
    uri = models.CharField(max_length=2000)
    peer_name = models.CharField(max_length=48)
    upstream_uri = models.CharField(max_length=2000)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        constraints = [models.UniqueConstraint(fields=["session", "uri"], name="subscription_unique_uri")]
