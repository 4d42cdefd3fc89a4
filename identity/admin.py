"""Admin for gateway trust, federated identities and the audit log (read-only, CSV export)."""

from __future__ import annotations

import csv
from collections.abc import Iterator
from typing import Any

from django.contrib import admin
from django.db.models import QuerySet
from django.http import HttpRequest, StreamingHttpResponse

from identity.models import AuditEvent, FederatedIdentity, TrustedGateway

CSV_COLUMNS = (
    "at", "username", "federated_issuer", "federated_subject", "client_id", "via", "peer", "method", "name",
    "outcome", "error_code", "latency_ms",
)


class _Echo:
    """A file-like object whose write returns the line, for streaming CSV (Django docs)."""

    def write(self, value: str) -> str:
        return value


def audit_csv_rows(queryset: QuerySet[AuditEvent]) -> Iterator[str]:
    """Yield the CSV lines of `queryset`, header first, reading rows in chunks."""
    writer = csv.writer(_Echo())
    yield writer.writerow(CSV_COLUMNS)
    for row in queryset.values_list(*CSV_COLUMNS).iterator(chunk_size=2000):
        yield writer.writerow(["|".join(v) if isinstance(v, list) else ("" if v is None else v) for v in row])


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

    list_display = ("at", "who", "client_id", "peer", "method", "name", "outcome", "error_code", "latency_ms")
    list_filter = ("outcome", "method", "peer", "at")
    search_fields = ("username", "federated_subject", "client_id", "peer", "name")
    date_hierarchy = "at"
    actions = ["export_csv"]
    list_per_page = 100

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
        response = StreamingHttpResponse(audit_csv_rows(queryset.order_by("at")), content_type="text/csv")
        response["Content-Disposition"] = 'attachment; filename="audit.csv"'
        return response


# --- consent (identity/consent.py, docs/CONSENT.md) ------------------------------------------

from django.utils import timezone  # noqa: E402

from identity import consent as consent_services  # noqa: E402  (also connects the policy-change signal)
from identity.models import ConsentGrant, ConsentPolicy, ConsentPrompt, RemoteConsent  # noqa: E402


@admin.register(ConsentPolicy)
class ConsentPolicyAdmin(admin.ModelAdmin):
    """Policies; the precedence is: most specific first, then priority, then deny > ask > allow."""

    list_display = ("__str__", "decision", "peer", "kind", "name_pattern", "username", "group", "client_id", "priority", "specificity", "enabled")
    list_filter = ("decision", "kind", "enabled", "peer")
    search_fields = ("description", "peer", "name_pattern", "username", "client_id", "federated_issuer", "federated_subject")
    list_editable = ("enabled",)

    @admin.display(description="specificity")
    def specificity(self, policy: ConsentPolicy) -> int:
        return policy.specificity()


@admin.register(ConsentPrompt)
class ConsentPromptAdmin(admin.ModelAdmin):
    """Prompts are created by calls and answered by their user; admins can see and expire them."""

    list_display = ("created_at", "username", "client_name", "owner_gateway", "peer", "kind", "name", "status", "decided_at")
    list_filter = ("status", "kind", "peer", "owner_gateway")
    search_fields = ("username", "federated_subject", "peer", "name", "client_id")
    actions = ["expire"]

    def get_readonly_fields(self, request: HttpRequest, obj: Any = None) -> list[str]:
        return [f.name for f in ConsentPrompt._meta.fields]

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
            consent_services.consent_grant_revoke(grant=grant)


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
