"""Peers (upstream MCP servers) and the catalog discovered from them."""

from __future__ import annotations

import shlex

from django.conf import settings
from django.core.exceptions import ValidationError
from django.core.validators import MinValueValidator, RegexValidator, URLValidator
from django.db import models

from federation.tls import check_pair, validate_ca_bundle, validate_client_cert, validate_client_key
from identity.crypto import EncryptedJSONField, EncryptedTextField

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
    # Encrypted at rest: stdio servers often take their API keys from the environment.
    env = EncryptedJSONField(default=dict, blank=True, help_text="Extra environment, for stdio peers.")
    enabled = models.BooleanField(default=True)
    is_gateway = models.BooleanField(
        default=False,
        help_text="Another fedmcp gateway, as the operator says (never the peer itself): once this gateway also trusts "
        "it (`gateway trust`), its catalog is imported with stable, hop-free names.",
    )
    remote_gateway = models.CharField(
        max_length=48, blank=True,
        help_text="The peer gateway's own name, set on sync only while it is believed: marked a gateway and trusted "
        "under this name (identity/trust/gateways.py `peer_gateway_standing`).",
    )
    suggested_gateway = models.CharField(
        max_length=48, blank=True,
        help_text="The fedmcp gateway name the peer gave itself on sync, when that is not believed: a hint for the "
        "operator (mark it a gateway and trust it), never trust by itself.",
    )
    # What this gateway authenticates with at a peer gateway (client credentials, RFC 6749 §4.4).
    client_id = models.CharField(max_length=255, blank=True, help_text="Client id this gateway has at the peer gateway.")
    client_secret = EncryptedTextField(blank=True, help_text="Encrypted at rest; never shown.")
    token_url = models.CharField(
        max_length=2000,
        blank=True,
        validators=[URLValidator(schemes=["http", "https"])],
        help_text="The peer's token endpoint; discovered from its metadata when blank.",
    )
    # TLS to HTTPS and WSS peers (federation/tls.py). Certificates are public; the key is not.
    tls_ca_bundle = models.TextField(
        blank=True, validators=[validate_ca_bundle], verbose_name="TLS CA bundle",
        help_text="PEM certificates of the CAs that sign the peer's certificate. When set, only these are trusted for "
        "this peer; when blank, the default trust store.",
    )
    tls_client_cert = models.TextField(
        blank=True, validators=[validate_client_cert], verbose_name="TLS client certificate",
        help_text="PEM certificate (and intermediates) this gateway presents when the peer requires mutual TLS.",
    )
    tls_client_key = EncryptedTextField(
        blank=True, validators=[validate_client_key], verbose_name="TLS client key",
        help_text="PEM private key of the client certificate. Encrypted at rest; never shown.",
    )
    per_identity = models.BooleanField(
        default=False,
        help_text="Give each user their own connection in both protocol eras (stdio: their own process), for servers "
        "that hold a user's state in the process. Without it each user still gets their own handshake-era session, "
        "and 2026-07-28 connections, which keep nothing between requests, are shared.",
    )
    user_oauth = models.BooleanField(
        default=False,
        help_text="Each user connects their own account at the peer's OAuth authorization server (/connect/<peer>); "
        "calls carry that user's token (federation/upstream_oauth.py).",
    )
    max_processes = models.PositiveIntegerField(
        default=8, help_text="stdio: most per-user processes per worker; beyond it the least recently used idle one is stopped."
    )
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

    def clean(self) -> None:
        # A certificate without its key is tolerated here (a configuration import leaves keys
        # out); connecting then says the key is missing. A key needs its certificate.
        check_pair(self.tls_client_cert, self.tls_client_key)
        if self.has_tls_settings() and not self.url.startswith(("https://", "wss://")):
            raise ValidationError("TLS settings (CA bundle, client certificate) need an https:// or wss:// peer URL.")
        if self.user_oauth:
            # The same rules as `peer add --user-oauth`, for the admin and the API too.
            if self.transport == Transport.STDIO or self.is_gateway or self.client_id:
                raise ValidationError({"user_oauth": "Per-user OAuth is for HTTP, SSE and WebSocket MCP servers, not for stdio peers or peer gateways."})
            if self.name == "callback":
                raise ValidationError({"name": "'callback' is taken by /connect/callback; choose another name for a per-user OAuth peer."})

    def has_tls_settings(self) -> bool:
        return bool(self.tls_ca_bundle or self.tls_client_cert or self.tls_client_key)

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
        verbose_name_plural = "catalog entries"
        constraints = [
            models.UniqueConstraint(fields=["peer", "kind", "upstream_name"], name="catalog_unique_item")
        ]
        indexes = [models.Index(fields=["kind", "name"])]

    def __str__(self) -> str:
        return f"{self.peer.name}:{self.kind}:{self.upstream_name}"


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


class RateLimitScope(models.TextChoices):
    IDENTITY = "identity", "Per identity (each user and client pair has its own bucket)"
    PEER = "peer", "Per peer (all callers of the peer share one bucket)"


class RateLimit(models.Model):
    """A token-bucket limit on the calls this gateway forwards to upstreams.

    Identity rules: the most specific matching row applies (user and client, then user, then
    client, then a row naming neither, the default), and its bucket belongs to what it names:
    a user (all their clients together), a client (all its users together), or that pair. The
    default gives each caller its own: a user (all their clients), a federated user, or a
    client acting for nobody (federation/ratelimit.py `identity_bucket`). Peer rules: one bucket per peer, shared by all callers, to protect the
    upstream; a row without a peer is the default for every peer. No matching row: no limit.
    """

    scope = models.CharField(max_length=10, choices=RateLimitScope.choices)
    user = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.CASCADE, related_name="+",
        help_text="Identity rules: this user only (blank: any user).",
    )
    client_id = models.CharField(
        max_length=255, blank=True, help_text="Identity rules: this OAuth client only (blank: any client)."
    )
    peer = models.ForeignKey(
        Peer, null=True, blank=True, on_delete=models.CASCADE, related_name="rate_limits",
        help_text="Peer rules: this peer only (blank: the default for every peer).",
    )
    rate_per_minute = models.PositiveIntegerField(
        validators=[MinValueValidator(1)], help_text="Sustained calls per minute (the bucket refills at this rate)."
    )
    burst = models.PositiveIntegerField(
        validators=[MinValueValidator(1)], help_text="Calls allowed at once after a quiet period (the bucket size)."
    )
    updated_at = models.DateTimeField(auto_now=True)


    class Meta:
        ordering = ["scope", "peer__name", "user__username", "client_id"]
        constraints = [
            models.CheckConstraint(
                condition=models.Q(scope=RateLimitScope.IDENTITY, peer__isnull=True)
                | models.Q(scope=RateLimitScope.PEER, user__isnull=True, client_id=""),
                name="ratelimit_target_matches_scope",
            ),
            models.UniqueConstraint(
                fields=["scope"], condition=models.Q(user__isnull=True, client_id="", peer__isnull=True),
                name="ratelimit_one_default_per_scope",
            ),
            models.UniqueConstraint(
                fields=["user", "client_id"], condition=models.Q(user__isnull=False), name="ratelimit_one_per_user_client"
            ),
            models.UniqueConstraint(
                fields=["client_id"], condition=models.Q(user__isnull=True) & ~models.Q(client_id=""),
                name="ratelimit_one_per_client",
            ),
            models.UniqueConstraint(fields=["peer"], condition=models.Q(peer__isnull=False), name="ratelimit_one_per_peer"),
        ]

    def __str__(self) -> str:
        return f"{self.target()}: {self.rate_per_minute}/min, burst {self.burst}"

    def target(self) -> str:
        """Say whom the rule applies to, e.g. "user alice, client app" or "every peer"."""
        if self.scope == RateLimitScope.PEER:
            return f"peer {self.peer.name}" if self.peer_id else "every peer"
        parts = []
        if self.user_id:
            parts.append(f"user {self.user}")
        if self.client_id:
            parts.append(f"client {self.client_id}")
        return ", ".join(parts) or "every identity"

    def clean(self) -> None:
        if self.scope == RateLimitScope.IDENTITY and self.peer_id:
            raise ValidationError({"peer": "Identity rules apply to callers; leave the peer blank."})
        if self.scope == RateLimitScope.PEER and (self.user_id or self.client_id):
            raise ValidationError("Peer rules apply to every caller; leave the user and client blank.")
