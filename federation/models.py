"""Peers (upstream MCP servers) and the catalog discovered from them."""

from __future__ import annotations

import shlex
from typing import Any

from django.core.validators import RegexValidator, URLValidator
from django.db import models

PEER_NAME_WORD = r"[a-z0-9]+(?:-[a-z0-9]+)*"
PEER_NAME_PATTERN = rf"^{PEER_NAME_WORD}\Z"
"""Peer names are lowercase words joined by single hyphens.

They never contain "__" or "/", so a namespaced name (`peer__tool`) or URI
(`fedmcp://peer/uri`) always splits back into exactly one peer.
"""

peer_name_validator = RegexValidator(
    PEER_NAME_PATTERN,
    "Use lowercase letters, digits and single hyphens (e.g. 'time' or 'github-enterprise').",
)


class Transport(models.TextChoices):
    STREAMABLE_HTTP = "streamable-http", "Streamable HTTP"
    SSE = "sse", "HTTP+SSE (legacy)"
    WEBSOCKET = "websocket", "WebSocket"
    STDIO = "stdio", "stdio (local process)"


class PeerQuerySet(models.QuerySet["Peer"]):
    def enabled(self) -> PeerQuerySet:
        return self.filter(enabled=True)


class Peer(models.Model):
    """An upstream MCP server this gateway routes to."""

    name = models.CharField(max_length=48, unique=True, validators=[peer_name_validator])
    transport = models.CharField(max_length=20, choices=Transport.choices)
    # A CharField, not a URLField: URLField always adds a validator that refuses ws:// and wss://.
    url = models.CharField(
        max_length=2000,
        blank=True,
        validators=[URLValidator(schemes=["http", "https", "ws", "wss"])],
        help_text="For HTTP, SSE and WebSocket peers.",
    )
    command = models.CharField(max_length=1000, blank=True, help_text="Executable, for stdio peers.")
    args = models.JSONField(default=list, blank=True, help_text="Arguments, for stdio peers.")
    env = models.JSONField(default=dict, blank=True, help_text="Extra environment, for stdio peers.")
    enabled = models.BooleanField(default=True)
    is_gateway = models.BooleanField(
        default=False, help_text="Another fedmcp gateway: its catalog is imported with stable, hop-free names."
    )
    remote_gateway = models.CharField(max_length=48, blank=True, help_text="The peer gateway's own name, learned on sync.")
    connect_timeout = models.FloatField(default=10.0, help_text="Seconds to connect and handshake.")
    call_timeout = models.FloatField(default=60.0, help_text="Seconds one call may take.")

    # What the last successful sync learned about the upstream.
    protocol_version = models.CharField(max_length=20, blank=True)
    server_info = models.JSONField(default=dict, blank=True)
    capabilities = models.JSONField(default=dict, blank=True)
    instructions = models.TextField(blank=True)
    last_synced_at = models.DateTimeField(null=True, blank=True)
    last_error = models.TextField(blank=True)

    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    objects = PeerQuerySet.as_manager()

    class Meta:
        ordering = ["name"]

    def __str__(self) -> str:
        return self.name

    def is_reachable(self) -> bool | None:
        """Whether the last health check succeeded (None before the first one)."""
        last = self.health_checks.first()
        return None if last is None else last.ok

    def target(self) -> str:
        """Return where the peer lives: its URL, or its command line for stdio."""
        if self.transport == Transport.STDIO:
            return shlex.join([self.command, *self.args])
        return self.url


class CatalogKind(models.TextChoices):
    TOOL = "tool", "Tool"
    RESOURCE = "resource", "Resource"
    RESOURCE_TEMPLATE = "resource_template", "Resource template"
    PROMPT = "prompt", "Prompt"


class CatalogEntryQuerySet(models.QuerySet["CatalogEntry"]):
    def visible(self) -> CatalogEntryQuerySet:
        """Entries hosts may see: enabled, on an enabled peer."""
        return self.filter(enabled=True, peer__enabled=True)


class CatalogEntry(models.Model):
    """One tool, resource, resource template or prompt an upstream listed.

    `payload` is the upstream's own JSON for the item, kept verbatim so fields this gateway does
    not know about still reach hosts.
    """

    peer = models.ForeignKey(Peer, on_delete=models.CASCADE, related_name="catalog")
    kind = models.CharField(max_length=20, choices=CatalogKind.choices)
    upstream_name = models.CharField(
        max_length=2000, help_text="Name (tools, prompts), URI (resources) or URI template."
    )
    name = models.CharField(max_length=2200, db_index=True, default="", help_text="The name hosts see on the aggregated endpoints.")
    home = models.CharField(max_length=100, db_index=True, default="", help_text="Where it lives: 'peer' here, 'gateway.peer' elsewhere.")
    position = models.PositiveIntegerField(default=0, help_text="Order in the upstream's list.")
    payload = models.JSONField(default=dict)
    enabled = models.BooleanField(default=True)
    updated_at = models.DateTimeField(auto_now=True)

    objects = CatalogEntryQuerySet.as_manager()

    class Meta:
        ordering = ["peer__name", "kind", "position"]
        constraints = [
            models.UniqueConstraint(fields=["peer", "kind", "upstream_name"], name="catalog_unique_item")
        ]
        indexes = [models.Index(fields=["kind", "name"])]

    def __str__(self) -> str:
        return f"{self.peer.name}:{self.kind}:{self.upstream_name}"

    def as_dict(self) -> dict[str, Any]:
        return dict(self.payload)


class PeerHealthCheck(models.Model):
    """One health probe of a peer: ping (handshake era) or server/discover (2026-07-28)."""

    peer = models.ForeignKey(Peer, on_delete=models.CASCADE, related_name="health_checks")
    ok = models.BooleanField()
    latency_ms = models.FloatField(null=True, blank=True)
    error = models.TextField(blank=True)
    checked_at = models.DateTimeField(auto_now_add=True, db_index=True)

    class Meta:
        ordering = ["-checked_at"]

    def __str__(self) -> str:
        return f"{self.peer.name} {'ok' if self.ok else 'failed'} at {self.checked_at:%Y-%m-%d %H:%M:%S}"
