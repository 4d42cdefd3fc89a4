"""Peer-gateway trust, federated identities, used assertions and the audit trail."""

from __future__ import annotations

from typing import Any

from django.conf import settings
from django.core.validators import RegexValidator, URLValidator
from django.db import models
from django.utils import timezone
from oauth2_provider.models import Application

from identity.crypto import EncryptedTextField

gateway_name_validator = RegexValidator(
    r"^[a-z0-9]+(?:-[a-z0-9]+)*\Z", "Use lowercase letters, digits and single hyphens (e.g. 'acme-eu')."
)


class TrustedGatewayQuerySet(models.QuerySet["TrustedGateway"]):
    def update(self, **kwargs: Any) -> int:
        """Update, and drop the workers' cached trust and routes (signals do not see `QuerySet.update`)."""
        from fedmcp_lib.caching import bump

        count = super().update(**kwargs)
        bump("tokens", "catalog")
        return count


class TrustedGateway(models.Model):
    """Another fedmcp gateway allowed to call this one on behalf of its own users.

    It authenticates with the client-credentials `application` (its token has the `gateway`
    scope) and asserts the acting user in a JWT signed with a key from its JWKS; only users of
    its own `issuer` can be asserted.
    """

    name = models.CharField(max_length=48, unique=True, validators=[gateway_name_validator])
    issuer = models.CharField(
        max_length=2000, unique=True, validators=[URLValidator(schemes=["http", "https"])],
        help_text="The `iss` of its assertions: its public URL, e.g. https://mcp.partner.example.",
    )
    jwks_url = models.CharField(
        max_length=2000, blank=True, validators=[URLValidator(schemes=["http", "https"])],
        help_text="Where its public keys are; default <issuer>/.well-known/jwks.json.",
    )
    jwks = models.JSONField(default=dict, blank=True, help_text="Its public keys inline (a JWK Set); used instead of fetching.")
    application = models.OneToOneField(Application, on_delete=models.CASCADE, related_name="trusted_gateway")
    enabled = models.BooleanField(default=True)
    created_at = models.DateTimeField(auto_now_add=True)

    objects = TrustedGatewayQuerySet.as_manager()

    class Meta:
        ordering = ["name"]

    def __str__(self) -> str:
        return f"{self.name} ({self.issuer})"

    def keys_url(self) -> str:
        return self.jwks_url or f"{self.issuer.rstrip('/')}/.well-known/jwks.json"


class FederatedIdentity(models.Model):
    """A user of a trusted gateway, as that gateway asserted them: (issuer, subject).

    `user` is left empty until an administrator links the identity to a local account.
    """

    trusted_gateway = models.ForeignKey(TrustedGateway, on_delete=models.CASCADE, related_name="identities")
    issuer = models.CharField(max_length=2000)
    subject = models.CharField(max_length=255)
    user = models.ForeignKey(settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL, related_name="federated_identities")
    first_seen_at = models.DateTimeField(auto_now_add=True)
    last_seen_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["issuer", "subject"]
        constraints = [models.UniqueConstraint(fields=["issuer", "subject"], name="federated_identity_unique")]
        verbose_name_plural = "federated identities"

    def __str__(self) -> str:
        return f"{self.subject} @ {self.issuer}"


class UsedAssertion(models.Model):
    """The `jti` of an accepted assertion, kept until it expires so it cannot be replayed."""

    issuer = models.CharField(max_length=2000)
    jti = models.CharField(max_length=255)
    expires_at = models.DateTimeField(db_index=True)

    class Meta:
        constraints = [models.UniqueConstraint(fields=["issuer", "jti"], name="used_assertion_unique")]


class AuditEventQuerySet(models.QuerySet["AuditEvent"]):
    def update(self, **kwargs: Any) -> int:
        raise TypeError("audit events are append-only")


class AuditEvent(models.Model):
    """One forwarded call: who (user or federated identity, client, path), what, and how it went.

    Append-only: saving an existing event or updating through the queryset raises.
    """

    at = models.DateTimeField(default=timezone.now, db_index=True)
    user = models.ForeignKey(settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL, related_name="+")
    username = models.CharField(max_length=255, blank=True)
    federated_issuer = models.CharField(max_length=2000, blank=True)
    federated_subject = models.CharField(max_length=255, blank=True)
    client_id = models.CharField(max_length=255, blank=True)
    via = models.JSONField(default=list, blank=True, help_text="Gateways the call came through, oldest first.")
    peer = models.CharField(max_length=48)
    method = models.CharField(max_length=64)
    name = models.CharField(max_length=2000, blank=True, help_text="Tool or prompt name, or resource URI, as the peer knows it.")
    arguments_hash = models.CharField(
        max_length=64, blank=True,
        help_text=(
            "SHA-256 of the canonical JSON arguments the call was decided on and sent with (tools/call, prompts/get; "
            "identity/call_digest.py `arguments_hash`): what a consent approval is bound to."
        ),
    )

    class Outcome(models.TextChoices):
        OK = "ok", "ok"
        ERROR = "error", "error"
        INPUT = "input", "input required"
        """The host was answered `input_required`: the call waits for its retry (consent, or the upstream's question)."""
        INTERRUPTED = "interrupted", "interrupted"
        """The call was sent to its upstream, and the worker serving it ended (killed, crashed) before
        recording how it went: found by another worker's upkeep from its `AuditIntent`."""

    outcome = models.CharField(max_length=16, choices=Outcome.choices)
    decision = models.CharField(
        max_length=16, blank=True,
        help_text=(
            "What consent decided: allow, grant (a remembered approval), ask, approved, denied, timeout, "
            "deny (a policy), ask-home (asked the user's home gateway), rejected (the home gateway's decision "
            "was not acceptable), home (the request was left to the user's home gateway) or continued "
            "(a further input_required round of a call the user approved)."
        ),
    )
    error_code = models.IntegerField(null=True, blank=True)
    latency_ms = models.FloatField()

    objects = AuditEventQuerySet.as_manager()

    class Meta:
        ordering = ["-at"]
        indexes = [
            models.Index(fields=["federated_issuer", "federated_subject"]),
            # Consent's "has this user used this peer" (identity/consent.py `_peer_used`).
            models.Index(fields=["user", "peer", "method"], name="audit_user_peer_method"),
        ]

    def __str__(self) -> str:
        who = f"{self.federated_subject}@{self.federated_issuer}" if self.federated_issuer else self.username or "-"
        return f"{self.at:%Y-%m-%d %H:%M:%S} {who} {self.method} {self.peer}:{self.name} {self.outcome}"

    def save(self, *args: Any, **kwargs: Any) -> None:
        if not self._state.adding:
            raise TypeError("audit events are append-only")
        super().save(*args, **kwargs)


class AuditIntentQuerySet(models.QuerySet["AuditIntent"]):
    def lease_expired(self) -> AuditIntentQuerySet:
        """Intents no worker renews any more: their worker died (or lost the database for a lease)."""
        return self.filter(lease_until__lt=timezone.now())


class AuditIntent(models.Model):
    """A call sent to its upstream whose `AuditEvent` is not written yet (identity/audit.py).

    Committed before the upstream is called, deleted in the transaction that writes the call's
    event. The worker serving the call renews `lease_until`; one that has run out belongs to a
    worker that ended without writing the event, and is turned into an `interrupted` event.
    """

    id = models.UUIDField(primary_key=True, help_text="Chosen by the worker, so the event that completes it names it without a read.")
    lease_until = models.DateTimeField(db_index=True)
    event = models.JSONField(help_text="The AuditEvent fields known when the call was sent (identity/audit.py `PendingEvent`).")

    objects = AuditIntentQuerySet.as_manager()

    def __str__(self) -> str:
        return f"{self.event.get('method', '')} {self.event.get('peer', '')}:{self.event.get('name', '')} until {self.lease_until:%H:%M:%S}"


# --- consent ---------------------------------------------------------------------------------


class ConsentDecision(models.TextChoices):
    ALLOW = "allow", "allow"
    ASK = "ask", "ask the user"
    DENY = "deny", "deny"


class ConsentKind(models.TextChoices):
    TOOL = "tool", "tool (tools/call)"
    RESOURCE = "resource", "resource (resources/read)"
    PROMPT = "prompt", "prompt (prompts/get)"
    # Server->client requests an upstream sends during a call; the name is the call's.
    SAMPLING = "sampling", "sampling (sampling/createMessage from an upstream)"
    ELICITATION = "elicitation", "elicitation (elicitation/create from an upstream)"


class ConsentPolicy(models.Model):
    """An administrator's rule: calls matching every non-blank field get `decision`.

    Precedence (identity/consent/policy.py `decide`, docs/CONSENT.md): the policy matching with the
    most specific fields wins, then the higher `priority`, then deny over ask over allow.
    """

    description = models.CharField(max_length=200, blank=True)
    peer = models.CharField(max_length=48, blank=True, help_text="Peer name; blank = any peer.")
    kind = models.CharField(
        max_length=16, choices=ConsentKind.choices, blank=True,
        help_text="Blank = tools, resources and prompts; sampling and elicitation policies must name their kind.",
    )
    name_pattern = models.CharField(
        max_length=500, default="*",
        help_text="fnmatch pattern on the name the peer knows (tool/prompt name or resource URI; for sampling and "
        "elicitation, the tool during whose call the upstream asks).",
    )
    username = models.CharField(max_length=150, blank=True, help_text="Local user; blank = anyone.")
    group = models.ForeignKey("auth.Group", null=True, blank=True, on_delete=models.CASCADE, related_name="+")
    federated_issuer = models.CharField(max_length=2000, blank=True, help_text="Home gateway of a federated user; blank = any.")
    federated_subject = models.CharField(max_length=255, blank=True)
    client_id = models.CharField(max_length=255, blank=True, help_text="OAuth client (host application); blank = any.")
    decision = models.CharField(max_length=8, choices=ConsentDecision.choices)
    priority = models.IntegerField(default=0, help_text="Among equally specific policies, the higher wins.")
    redact_fields = models.JSONField(
        default=list, blank=True, help_text="Argument names shown as [redacted] on the consent page, e.g. [\"password\"]."
    )
    enabled = models.BooleanField(default=True)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["-priority", "peer", "name_pattern"]
        verbose_name_plural = "consent policies"

    def __str__(self) -> str:
        return f"{self.decision}: {self.peer or '*'}/{self.kind or '*'}:{self.name_pattern}"

    def specificity(self) -> int:
        """How many criteria this policy names (the first precedence key)."""
        fields = [self.peer, self.kind, self.username, self.group_id, self.federated_issuer, self.federated_subject, self.client_id]
        return sum(1 for f in fields if f) + (1 if self.name_pattern not in ("", "*") else 0)


class ConsentPromptQuerySet(models.QuerySet["ConsentPrompt"]):
    def pending_for(self, user: Any) -> ConsentPromptQuerySet:
        from django.utils import timezone

        return self.filter(user=user, status=ConsentPrompt.Status.PENDING, expires_at__gt=timezone.now())


class ConsentPrompt(models.Model):
    """A call waiting for its user's answer on /consent/<id>; the id is random and single-use."""

    class Status(models.TextChoices):
        PENDING = "pending"
        APPROVED = "approved"
        DENIED = "denied"
        EXPIRED = "expired"

    id = models.CharField(primary_key=True, max_length=64, editable=False)
    user = models.ForeignKey(settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.CASCADE, related_name="consent_prompts")
    username = models.CharField(max_length=255, blank=True)
    federated_issuer = models.CharField(max_length=2000, blank=True)
    federated_subject = models.CharField(max_length=255, blank=True)
    client_id = models.CharField(max_length=255, blank=True)
    client_name = models.CharField(max_length=255, blank=True)
    via = models.JSONField(default=list, blank=True)
    peer = models.CharField(max_length=48)
    kind = models.CharField(max_length=16, choices=ConsentKind.choices)
    name = models.CharField(max_length=2000)
    arguments = models.JSONField(default=dict, blank=True, help_text="The call's arguments, sensitive fields redacted.")
    request = models.JSONField(
        default=dict, blank=True,
        help_text="Sampling/elicitation: what the upstream asks of the host (messages, system prompt, schema), as shown.",
    )
    held = models.JSONField(
        null=True, blank=True, editable=False,
        help_text="2026-07-28 hosts: the upstream's input_required result, given to the host once approved.",
    )
    policy = models.ForeignKey(ConsentPolicy, null=True, blank=True, on_delete=models.SET_NULL, related_name="+")
    status = models.CharField(max_length=8, choices=Status.choices, default=Status.PENDING)
    binding = models.CharField(
        max_length=64, blank=True, db_index=True, editable=False,
        help_text="The exact call asked about (caller, client, peer, kind, name, arguments digest): its retry finds this prompt.",
    )
    created_at = models.DateTimeField(auto_now_add=True)
    expires_at = models.DateTimeField()
    decided_at = models.DateTimeField(null=True, blank=True)
    used_at = models.DateTimeField(null=True, blank=True, help_text="When the approved call went ahead (an approval is used once).")
    owner_gateway = models.CharField(
        max_length=48, blank=True,
        help_text="Set when another gateway owns the call and asked this one, the user's home (distributed consent).",
    )
    challenge = models.TextField(blank=True, help_text="The owner gateway's signed challenge this prompt answers.")
    remember_seconds = models.PositiveIntegerField(
        null=True, blank=True, help_text="\"Approve and remember\" on a remote prompt: the owner gateway keeps the grant this long.",
    )
    deferred_by = models.JSONField(
        default=dict, blank=True,
        help_text=(
            "Sampling/elicitation left to this gateway by one further along: that gateway, its server and call, "
            "and who vouches for them (peer, signature or reported; identity/consent/deferral.py)."
        ),
    )
    call = models.CharField(
        max_length=64, blank=True,
        help_text="Sampling/elicitation: the host call during which the upstream asked (random); /consent shows a call's prompts together.",
    )

    objects = ConsentPromptQuerySet.as_manager()

    class Meta:
        ordering = ["-created_at"]

    def __str__(self) -> str:
        return f"{self.username or self.federated_subject} {self.kind} {self.peer}:{self.name} {self.status}"

    def is_pending(self) -> bool:
        from django.utils import timezone

        return self.status == self.Status.PENDING and self.expires_at > timezone.now()

    def current_status(self) -> str:
        """The status as of now: pending past `expires_at` is expired, even before a worker marks it so.

        A 2026-07-28 host's prompt has no worker waiting on it, so nothing rewrites its row.
        """
        if self.status == self.Status.PENDING and not self.is_pending():
            return self.Status.EXPIRED
        return self.status


class UsedContinuation(models.Model):
    """The nonce of a continuation a 2026-07-28 host came back with, kept until it expires so it is used once.

    When an upstream answers a call the user approved with `input_required`, the gateway's
    `requestState` for that round carries the approval to the host's retry, which is then not
    asked about again (mcp_endpoint/pipeline/continuation.py; docs/CONSENT.md "Further rounds of an
    approved call"). Each such state names a fresh nonce; a retry spends it.
    """

    nonce = models.CharField(primary_key=True, max_length=64, editable=False)
    expires_at = models.DateTimeField(db_index=True)

    def __str__(self) -> str:
        return self.nonce


class ConsentGrantQuerySet(models.QuerySet["ConsentGrant"]):
    def active(self) -> ConsentGrantQuerySet:
        from django.utils import timezone

        return self.filter(revoked_at__isnull=True, expires_at__gt=timezone.now())


class ConsentGrant(models.Model):
    """A remembered approval: `user` may call `name` on `peer` (from `client_id`) until `expires_at`.

    For a user of another gateway who answered there (distributed consent), `user` is empty and
    the grant names the federated identity (`federated_issuer`, `federated_subject`).
    """

    user = models.ForeignKey(settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.CASCADE, related_name="consent_grants")
    federated_issuer = models.CharField(max_length=2000, blank=True)
    federated_subject = models.CharField(max_length=255, blank=True)
    peer = models.CharField(max_length=48)
    kind = models.CharField(max_length=16, choices=ConsentKind.choices)
    name = models.CharField(max_length=2000)
    client_id = models.CharField(max_length=255, blank=True, help_text="Blank = any client application.")
    created_at = models.DateTimeField(auto_now_add=True)
    expires_at = models.DateTimeField()
    revoked_at = models.DateTimeField(null=True, blank=True)
    prompt = models.ForeignKey(ConsentPrompt, null=True, blank=True, on_delete=models.SET_NULL, related_name="+")

    objects = ConsentGrantQuerySet.as_manager()

    class Meta:
        ordering = ["-created_at"]

    def __str__(self) -> str:
        return f"{self.who()} {self.kind} {self.peer}:{self.name} until {self.expires_at:%Y-%m-%d %H:%M}"

    def who(self) -> str:
        """The local user, or `subject @ issuer` for a federated identity."""
        return str(self.user) if self.user_id is not None else f"{self.federated_subject} @ {self.federated_issuer}"

    def is_active(self) -> bool:
        from django.utils import timezone

        return self.revoked_at is None and self.expires_at > timezone.now()


# --- per-user upstream credentials ----------------------------------------------------------


class UpstreamOAuthClient(models.Model):
    """How this gateway is known to the authorization server of a per-user OAuth peer.

    Filled in by discovery (RFC 9728 protected-resource metadata, then RFC 8414 server metadata)
    and by registration: an operator-supplied client, a Client ID Metadata Document, or RFC 7591
    dynamic registration (federation/upstream_oauth.py).
    """

    class Registration(models.TextChoices):
        OPERATOR = "operator", "supplied by the operator"
        METADATA_DOCUMENT = "metadata-document", "client ID metadata document"
        DYNAMIC = "dynamic", "dynamic registration (RFC 7591)"

    peer = models.OneToOneField("federation.Peer", on_delete=models.CASCADE, related_name="oauth_client")
    resource = models.CharField(max_length=2000, blank=True, help_text="The upstream's resource identifier (RFC 8707 `resource`).")
    issuer = models.CharField(max_length=2000, blank=True)
    authorization_endpoint = models.CharField(max_length=2000, blank=True)
    token_endpoint = models.CharField(max_length=2000, blank=True)
    registration_endpoint = models.CharField(max_length=2000, blank=True)
    revocation_endpoint = models.CharField(max_length=2000, blank=True)
    iss_parameter_supported = models.BooleanField(
        default=False, help_text="The server promises `iss` in authorization responses (RFC 9207); then it must be there."
    )
    scope = models.CharField(max_length=1000, blank=True, help_text="Scopes asked for; blank: what the upstream's challenge names.")
    client_id = models.CharField(max_length=2000, blank=True)
    client_secret = EncryptedTextField(blank=True, help_text="Encrypted at rest; never shown.")
    token_endpoint_auth_method = models.CharField(max_length=40, default="none")
    registration = models.CharField(max_length=20, choices=Registration.choices, blank=True)
    redirect_uri = models.CharField(max_length=2000, blank=True, help_text="The callback the client was registered with.")
    catalog_user = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL, related_name="+",
        help_text="Whose connection lists the peer's catalog (blank: the user who connected first).",
    )
    discovered_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        verbose_name = "upstream OAuth client"

    def __str__(self) -> str:
        return f"{self.peer} at {self.issuer or '(not discovered)'}"

    def is_registered(self) -> bool:
        return bool(self.client_id and self.token_endpoint and self.authorization_endpoint)


class UpstreamTokenQuerySet(models.QuerySet["UpstreamToken"]):
    def for_catalog(self, peer_id: int) -> UpstreamToken | None:
        """The connection that lists `peer_id`'s catalog: the designated user's, else the oldest."""
        client = UpstreamOAuthClient.objects.filter(peer_id=peer_id).first()
        rows = self.filter(peer_id=peer_id)
        if client is not None and client.catalog_user_id is not None:
            designated = rows.filter(user_id=client.catalog_user_id).first()
            if designated is not None:
                return designated
        return rows.order_by("created_at", "pk").first()


class UpstreamToken(models.Model):
    """One user's tokens at a per-user OAuth peer, encrypted at rest and never shown."""

    user = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="upstream_tokens")
    peer = models.ForeignKey("federation.Peer", on_delete=models.CASCADE, related_name="upstream_tokens")
    issuer = models.CharField(max_length=2000)
    access_token = EncryptedTextField()
    refresh_token = EncryptedTextField(blank=True)
    expires_at = models.DateTimeField(null=True, blank=True)
    scope = models.CharField(max_length=1000, blank=True)
    generation = models.PositiveIntegerField(default=0, help_text="Counts refreshes; a refresh lease names the one it replaces.")
    refreshing_until = models.DateTimeField(null=True, blank=True, help_text="A worker is refreshing until then.")
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    objects = UpstreamTokenQuerySet.as_manager()

    class Meta:
        constraints = [models.UniqueConstraint(fields=["user", "peer"], name="upstream_token_one_per_user_peer")]
        ordering = ["peer__name", "user__username"]

    def __str__(self) -> str:
        return f"{self.user} at {self.peer}"

    def is_expired(self, margin_seconds: float = 0) -> bool:
        from datetime import timedelta

        from django.utils import timezone

        return self.expires_at is not None and self.expires_at <= timezone.now() + timedelta(seconds=margin_seconds)


class UpstreamAuthorizationRequest(models.Model):
    """A connect flow in progress: found again by its `state`, used once, bound to a user and a browser session.

    Only the SHA-256 of the state is stored; the state itself is in the browser's redirect and
    its session.
    """

    state_hash = models.CharField(max_length=64, unique=True)
    user = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="+")
    peer = models.ForeignKey("federation.Peer", on_delete=models.CASCADE, related_name="+")
    code_verifier = EncryptedTextField()
    issuer = models.CharField(max_length=2000)
    redirect_uri = models.CharField(max_length=2000)
    created_at = models.DateTimeField(auto_now_add=True)
    expires_at = models.DateTimeField(db_index=True)

    def __str__(self) -> str:
        return f"{self.user} connecting to {self.peer}"


class RemoteConsent(models.Model):
    """A question this gateway sent to a user's home gateway, and its single-use answer.

    `owner`: this gateway's policy said "ask" for a user asserted by a trusted gateway; the
    nonce is the `jti` of the challenge it signed. `relay`: a gateway further on asked this one
    about a user who is not ours either; we asked the user's home in turn, and keep the far
    gateway's challenge (`upstream_claims`) to answer it once the home answers us.
    """

    class Role(models.TextChoices):
        OWNER = "owner"
        RELAY = "relay"

    class Status(models.TextChoices):
        PENDING = "pending"
        APPROVED = "approved"
        DENIED = "denied"

    nonce = models.CharField(primary_key=True, max_length=64, editable=False)
    role = models.CharField(max_length=8, choices=Role.choices, default=Role.OWNER)
    federated_issuer = models.CharField(max_length=2000, help_text="The user's home gateway, which answers.")
    federated_subject = models.CharField(max_length=255)
    client_id = models.CharField(max_length=255, blank=True)
    via = models.JSONField(default=list, blank=True)
    peer = models.CharField(max_length=48)
    kind = models.CharField(max_length=16, choices=ConsentKind.choices)
    name = models.CharField(max_length=2000)
    arguments_hash = models.CharField(max_length=64, help_text="SHA-256 of the call's canonical JSON arguments.")
    arguments = models.JSONField(default=dict, blank=True, help_text="The call's arguments, sensitive fields redacted.")
    upstream_claims = models.JSONField(default=dict, blank=True, help_text="Relay only: the far gateway's verified challenge.")
    status = models.CharField(max_length=8, choices=Status.choices, default=Status.PENDING)
    remember_seconds = models.PositiveIntegerField(null=True, blank=True)
    decision_jti = models.CharField(max_length=255, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)
    expires_at = models.DateTimeField(db_index=True)
    decided_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["-created_at"]
        verbose_name = "remote consent request"

    def __str__(self) -> str:
        return f"{self.federated_subject}@{self.federated_issuer} {self.kind} {self.peer}:{self.name} {self.status}"
