"""Admin for gateway trust, federated identities and the audit log (read-only, CSV export)."""

from __future__ import annotations

import csv
from collections.abc import Iterator
from typing import Any

from django import forms
from django.contrib import admin
from django.contrib.admin.options import IncorrectLookupParameters
from django.core.exceptions import PermissionDenied
from django.db.models import Q, QuerySet
from django.http import HttpRequest, HttpResponse, StreamingHttpResponse
from django.urls import URLPattern, path

from identity.models import AuditEvent, FederatedIdentity, TrustedGateway, UpstreamOAuthClient, UpstreamToken

CSV_COLUMNS = (
    "at", "username", "federated_issuer", "federated_subject", "client_id", "via", "peer", "method", "name",
    "arguments_hash", "decision", "outcome", "error_code", "latency_ms",
)
DECISIONS = (
    ("allow", "allow (policy or default)"),
    ("grant", "grant (remembered approval)"),
    ("ask", "ask (2026-07-28 first round)"),
    ("approved", "approved by the user"),
    ("denied", "denied by the user"),
    ("deny", "deny (policy)"),
    ("timeout", "timeout (nobody answered)"),
    ("ask-home", "ask-home (asked the user's home gateway)"),
    ("rejected", "rejected (the home gateway's decision)"),
    ("home", "home (request left to the user's home gateway)"),
    ("continued", "continued (a further round of an approved call)"),
)
"""The words consent leaves in AuditEvent.decision (docs/CONSENT.md "Outcomes")."""
FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")
"""What makes a spreadsheet read a cell as a formula (OWASP "CSV Injection")."""


class _Echo:
    """A file-like object whose write returns the line, for streaming CSV (Django docs)."""

    def write(self, value: str) -> str:
        return value


def csv_cell(value: Any) -> Any:
    """Return `value` as a CSV cell that no spreadsheet runs as a formula.

    Text comes from hosts, upstreams and peer gateways (tool names, subjects, gateway paths):
    text that starts like a formula gets a leading single quote, which spreadsheets show as
    text (OWASP). Numbers are written as they are (an error code is -32010, not a formula).
    """
    if value is None:
        return ""
    if isinstance(value, list):
        value = "|".join(value)
    if isinstance(value, str) and value.startswith(FORMULA_STARTS):
        return "'" + value
    return value


def audit_csv_rows(queryset: QuerySet[AuditEvent]) -> Iterator[str]:
    """Yield the CSV lines of `queryset`, header first, reading rows in chunks."""
    writer = csv.writer(_Echo())
    yield writer.writerow(CSV_COLUMNS)
    for row in queryset.values_list(*CSV_COLUMNS).iterator(chunk_size=2000):
        yield writer.writerow([csv_cell(v) for v in row])


def _csv_response(queryset: QuerySet[AuditEvent]) -> StreamingHttpResponse:
    response = StreamingHttpResponse(audit_csv_rows(queryset.order_by("at")), content_type="text/csv")
    response["Content-Disposition"] = 'attachment; filename="audit.csv"'
    return response


class DecisionListFilter(admin.SimpleListFilter):
    """Filter the audit log by what consent decided, including "no consent step"."""

    title = "consent decision"
    parameter_name = "decision"

    def lookups(self, request: HttpRequest, model_admin: admin.ModelAdmin) -> tuple[tuple[str, str], ...]:
        return (*DECISIONS, ("none", "none (not a consent-governed call)"))

    def queryset(self, request: HttpRequest, queryset: QuerySet[AuditEvent]) -> QuerySet[AuditEvent]:
        value = self.value()
        if value == "none":
            return queryset.filter(decision="")
        if value in dict(DECISIONS):
            return queryset.filter(decision=value)
        return queryset


@admin.register(TrustedGateway)
class TrustedGatewayAdmin(admin.ModelAdmin):
    list_display = ("name", "issuer", "enabled", "created_at")
    list_filter = ("enabled",)
    search_fields = ("name", "issuer")
    raw_id_fields = ("application",)


@admin.register(FederatedIdentity)
class FederatedIdentityAdmin(admin.ModelAdmin):
    list_display = ("subject", "issuer", "trusted_gateway", "user", "last_seen_at")
    list_filter = ("trusted_gateway",)
    search_fields = ("subject", "issuer", "user__username")
    raw_id_fields = ("user",)
    readonly_fields = ("trusted_gateway", "issuer", "subject", "first_seen_at", "last_seen_at")


@admin.register(AuditEvent)
class AuditEventAdmin(admin.ModelAdmin):
    """The audit trail: append-only, so no add, change or delete here."""

    list_display = ("at", "who", "client_id", "peer", "method", "name", "decision", "outcome", "error_code", "latency_ms")
    list_filter = (DecisionListFilter, "outcome", "method", "peer", ("user", admin.RelatedOnlyFieldListFilter), "client_id", "at")
    search_fields = ("username", "federated_subject", "client_id", "peer", "name")
    date_hierarchy = "at"
    actions = ["export_csv"]
    list_per_page = 100
    change_list_template = "admin/identity/auditevent/change_list.html"

    def get_urls(self) -> list[URLPattern]:
        export = path("export.csv", self.admin_site.admin_view(self.export_filtered_view), name="identity_auditevent_export")
        return [export, *super().get_urls()]

    def export_filtered_view(self, request: HttpRequest) -> HttpResponse:
        """Stream every event the change list shows with the same filters, search and date drill-down."""
        if not self.has_view_permission(request):
            raise PermissionDenied
        try:
            changelist = self.get_changelist_instance(request)
        except IncorrectLookupParameters:
            return HttpResponse("Unknown or invalid filter in the query string.", status=400, content_type="text/plain")
        return _csv_response(changelist.get_queryset(request))

    @admin.display(description="who")
    def who(self, event: AuditEvent) -> str:
        if event.federated_issuer:
            return f"{event.federated_subject} @ {event.federated_issuer}"
        return event.username or "-"

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    @admin.action(description="Export selected events as CSV", permissions=["view"])
    def export_csv(self, request: HttpRequest, queryset: QuerySet[AuditEvent]) -> StreamingHttpResponse:
        return _csv_response(queryset)


# --- consent (identity/consent/, docs/CONSENT.md) ------------------------------------------

from django.utils import timezone  # noqa: E402

from identity.consent.policy import consent_grant_revoke  # noqa: E402  (also connects the policy-change signal)
from identity.models import ConsentGrant, ConsentPolicy, ConsentPrompt, RemoteConsent  # noqa: E402


class ConsentPolicyForm(forms.ModelForm):
    """Peers, users, clients and names are chosen from what exists; a typo is refused, not saved to match nothing."""

    peer = forms.ChoiceField(required=False, help_text=ConsentPolicy._meta.get_field("peer").help_text)

    class Meta:
        model = ConsentPolicy
        fields = "__all__"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        from console import forms as listed

        super().__init__(*args, **kwargs)
        self.fields["peer"].choices = listed.peer_choices(self.instance.peer if self.instance.pk else "")
        self.fields["username"].widget = listed.ListedInput(listed.usernames)
        self.fields["client_id"].widget = listed.ListedInput(listed.client_ids)
        self.fields["name_pattern"].widget = listed.ListedInput(listed.catalog_names, attrs={"size": 60})
        self.fields["name_pattern"].help_text += " Pick a name from the list, or write a pattern with * or ?."

    def clean_username(self) -> str:
        from console.forms import user_named

        username = self.cleaned_data["username"].strip()
        if username:
            user_named(username)
        return username

    def clean(self) -> dict[str, Any]:
        from console.forms import check_name_pattern

        cleaned = super().clean()
        pattern = cleaned.get("name_pattern") or ""
        if "name_pattern" in self.changed_data or "peer" in self.changed_data or "kind" in self.changed_data:
            try:
                check_name_pattern(pattern, peer=cleaned.get("peer") or "", kind=cleaned.get("kind") or "")
            except forms.ValidationError as exc:
                self.add_error("name_pattern", exc)
        return cleaned


@admin.register(ConsentPolicy)
class ConsentPolicyAdmin(admin.ModelAdmin):
    """Policies; the precedence is: most specific first, then priority, then deny > ask > allow."""

    form = ConsentPolicyForm

    list_display = ("__str__", "decision", "peer", "kind", "name_pattern", "username", "group", "client_id", "priority", "specificity", "enabled")
    list_filter = ("decision", "kind", "enabled", "peer")
    search_fields = ("description", "peer", "name_pattern", "username", "client_id", "federated_issuer", "federated_subject")
    list_editable = ("enabled",)

    @admin.display(description="specificity")
    def specificity(self, policy: ConsentPolicy) -> int:
        return policy.specificity()


class ConsentPromptStatusFilter(admin.SimpleListFilter):
    """Status as of now: a pending prompt past its expiry is listed as expired (`ConsentPrompt.current_status`)."""

    title = "status"
    parameter_name = "status"

    def lookups(self, request: HttpRequest, model_admin: Any) -> list[tuple[str, str]]:
        return [(value, label) for value, label in ConsentPrompt.Status.choices]

    def queryset(self, request: HttpRequest, queryset: QuerySet[ConsentPrompt]) -> QuerySet[ConsentPrompt]:
        now = timezone.now()
        waiting = Q(status=ConsentPrompt.Status.PENDING, expires_at__gt=now)
        if self.value() == ConsentPrompt.Status.PENDING:
            return queryset.filter(waiting)
        if self.value() == ConsentPrompt.Status.EXPIRED:
            return queryset.filter(Q(status=ConsentPrompt.Status.EXPIRED) | Q(status=ConsentPrompt.Status.PENDING, expires_at__lte=now))
        if self.value() in ConsentPrompt.Status.values:
            return queryset.filter(status=self.value())
        return queryset


@admin.register(ConsentPrompt)
class ConsentPromptAdmin(admin.ModelAdmin):
    """Prompts are created by calls and answered by their user; admins can see and expire them."""

    list_display = ("created_at", "username", "client_name", "owner_gateway", "peer", "kind", "name", "current_status", "expires_at", "decided_at")
    list_filter = (ConsentPromptStatusFilter, "kind", "peer", "owner_gateway")
    search_fields = ("username", "federated_subject", "peer", "name", "client_id")
    actions = ["expire"]

    def get_readonly_fields(self, request: HttpRequest, obj: Any = None) -> list[str]:
        return ["current_status", *(f.name for f in ConsentPrompt._meta.fields if f.name != "status")]

    @admin.display(description="status", ordering="status")
    def current_status(self, prompt: ConsentPrompt) -> str:
        return ConsentPrompt.Status(prompt.current_status()).label

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    @admin.action(description="Expire the selected pending requests (the waiting calls fail with -32018)")
    def expire(self, request: HttpRequest, queryset: QuerySet[ConsentPrompt]) -> None:
        queryset.filter(status=ConsentPrompt.Status.PENDING).update(status=ConsentPrompt.Status.EXPIRED, decided_at=timezone.now())


@admin.register(ConsentGrant)
class ConsentGrantAdmin(admin.ModelAdmin):
    """Remembered approvals of every user; revoking takes effect on the next call."""

    list_display = ("who", "peer", "kind", "name", "client_id", "created_at", "expires_at", "revoked_at")
    list_filter = ("kind", "peer")
    search_fields = ("user__username", "federated_subject", "federated_issuer", "peer", "name", "client_id")
    raw_id_fields = ("user", "prompt")
    actions = ["revoke"]

    @admin.action(description="Revoke the selected approvals")
    def revoke(self, request: HttpRequest, queryset: QuerySet[ConsentGrant]) -> None:
        for grant in queryset:
            consent_grant_revoke(grant=grant)


# --- per-user upstream credentials ----------------------------------------------------------


class UpstreamOAuthClientForm(forms.ModelForm):
    """The client secret is write-only: never rendered back; a blank input keeps what is stored."""

    new_client_secret = forms.CharField(
        label="Client secret", required=False, strip=True, widget=forms.PasswordInput(render_value=False),
        help_text="Write-only, for a client the operator registered at the authorization server. Leave blank to keep the stored one.",
    )

    class Meta:
        model = UpstreamOAuthClient
        exclude = ["client_secret"]

    def save(self, commit: bool = True) -> UpstreamOAuthClient:
        client: UpstreamOAuthClient = super().save(commit=False)
        if self.cleaned_data.get("new_client_secret"):
            client.client_secret = self.cleaned_data["new_client_secret"]
        if commit:
            client.save()
        return client


@admin.register(UpstreamOAuthClient)
class UpstreamOAuthClientAdmin(admin.ModelAdmin):
    """How the gateway is registered at each per-user OAuth peer's authorization server."""

    form = UpstreamOAuthClientForm
    list_display = ("peer", "issuer", "client_id", "registration", "catalog_user", "discovered_at")
    search_fields = ("peer__name", "issuer", "client_id")
    raw_id_fields = ("catalog_user",)
    readonly_fields = (
        "resource", "issuer", "authorization_endpoint", "token_endpoint", "registration_endpoint", "revocation_endpoint",
        "iss_parameter_supported", "redirect_uri", "discovered_at",
    )


@admin.register(UpstreamToken)
class UpstreamTokenAdmin(admin.ModelAdmin):
    """Who has connected where. The tokens themselves are never shown; deleting one disconnects the user."""

    list_display = ("user", "peer", "issuer", "scope", "expires_at", "created_at", "updated_at")
    list_filter = ("peer",)
    search_fields = ("user__username", "peer__name")
    fields = ("user", "peer", "issuer", "scope", "expires_at", "created_at", "updated_at")
    readonly_fields = fields

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False


@admin.register(RemoteConsent)
class RemoteConsentAdmin(admin.ModelAdmin):
    """Questions this gateway sent to users' home gateways, and how they were answered (read-only)."""

    list_display = ("created_at", "role", "federated_subject", "federated_issuer", "peer", "kind", "name", "status", "decided_at")
    list_filter = ("role", "status", "kind", "peer")
    search_fields = ("federated_subject", "federated_issuer", "peer", "name", "client_id")

    def get_readonly_fields(self, request: HttpRequest, obj: Any = None) -> list[str]:
        return [f.name for f in RemoteConsent._meta.fields]

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False
