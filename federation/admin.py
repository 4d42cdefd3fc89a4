from typing import Any

from asgiref.sync import async_to_sync
from django import forms
from django.contrib import admin, messages
from django.core.exceptions import ValidationError
from django.db import transaction
from django.db.models import QuerySet
from django.http import HttpRequest
from django.utils.html import format_html

from federation.health import breakers
from federation.models import CatalogEntry, CatalogKind, Peer, PeerHealthCheck, RateLimit
from federation.services import SyncReport, catalog_set_enabled, peer_set_enabled, peer_sync_catalog
from federation.tls import check_current, validate_client_key

SYNC_FIELDS = (
    "transport", "url", "command", "args", "is_gateway", "client_id", "token_url", "tls_ca_bundle", "tls_client_cert",
    "new_client_secret", "new_tls_client_key", "clear_tls_client_key",
)
"""Changing any of these re-runs the connection test when a peer is saved in the admin."""


class PemField(forms.CharField):
    """PEM text in a textarea. Browsers send CRLF line ends: compare and store LF, so an unchanged
    certificate does not count as changed (which would re-run the connection test)."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(required=False, strip=False, widget=forms.Textarea(attrs={"rows": 4, "cols": 70}), **kwargs)

    def to_python(self, value: Any) -> str:
        text = str(super().to_python(value)).replace("\r\n", "\n").strip()
        return text + "\n" if text else ""


class PeerAdminForm(forms.ModelForm):
    """Peer form whose secrets are write-only: the client secret, the TLS client key and the stdio
    environment (which often holds API keys) are never rendered back; blank inputs keep what is
    stored."""

    new_client_secret = forms.CharField(
        label="Client secret", required=False, strip=True, widget=forms.PasswordInput(render_value=False),
        help_text="Write-only. Leave blank to keep the stored secret.",
    )
    clear_client_secret = forms.BooleanField(label="Remove the stored client secret", required=False)
    new_env = forms.CharField(
        label="Environment", required=False, widget=forms.Textarea(attrs={"rows": 3}),
        help_text="Write-only, for stdio peers: KEY=VALUE per line, replacing the stored environment. Leave blank to keep it.",
    )
    clear_env = forms.BooleanField(label="Remove the stored environment", required=False)
    tls_ca_bundle = PemField(label="TLS CA bundle", help_text=Peer._meta.get_field("tls_ca_bundle").help_text)
    tls_client_cert = PemField(label="TLS client certificate", help_text=Peer._meta.get_field("tls_client_cert").help_text)
    new_tls_client_key = PemField(
        label="TLS client key",
        help_text="Write-only: the PEM private key of the TLS client certificate. Leave blank to keep the stored key.",
    )
    clear_tls_client_key = forms.BooleanField(label="Remove the TLS client certificate and key", required=False)

    class Meta:
        model = Peer
        # What a sync learns of a gateway peer is shown, never edited: believing one is for
        # `is_gateway` and the trust records (identity/trust.py `peer_gateway_standing`).
        exclude = ["client_secret", "env", "tls_client_key", "remote_gateway", "suggested_gateway"]

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if self.instance.pk:
            stored = "a secret is stored" if self.instance.client_secret else "no secret is stored"
            self.fields["new_client_secret"].help_text += f" (Now: {stored}.)"
            names = ", ".join(sorted(self.instance.env)) or "none"
            self.fields["new_env"].help_text += f" (Now stored: {names}; values are not shown.)"
            stored = "a key is stored" if self.instance.tls_client_key else "no key is stored"
            self.fields["new_tls_client_key"].help_text += f" (Now: {stored}.)"

    def clean(self) -> dict[str, Any]:
        cleaned = super().clean()
        # Dates are checked only for what is being entered: a certificate that expired since must
        # not block disabling the peer or other edits.
        for name, what in (("tls_ca_bundle", "CA bundle"), ("tls_client_cert", "client certificate")):
            if name in self.changed_data and cleaned.get(name):
                try:
                    check_current(cleaned[name], what)
                except ValidationError as exc:
                    self.add_error(name, exc)
        if cleaned.get("clear_tls_client_key"):
            cleaned["tls_client_cert"] = ""
            self.instance.tls_client_key = ""
        elif cleaned.get("new_tls_client_key"):
            try:
                validate_client_key(cleaned["new_tls_client_key"])
            except ValidationError as exc:
                self.add_error("new_tls_client_key", exc)
                return cleaned
            # Set before the model's validation runs, which checks that the key fits the certificate.
            self.instance.tls_client_key = cleaned["new_tls_client_key"]
        if cleaned.get("tls_client_cert") and not self.instance.tls_client_key:
            self.add_error("new_tls_client_key", "The client certificate needs its private key.")
        return cleaned

    def clean_new_env(self) -> dict[str, str] | None:
        text = self.cleaned_data["new_env"]
        if not text.strip():
            return None
        env: dict[str, str] = {}
        for line in text.splitlines():
            if not line.strip():
                continue
            key, sep, value = line.partition("=")
            if not sep or not key.strip():
                raise forms.ValidationError("Write one KEY=VALUE per line.")
            env[key.strip()] = value
        return env

    def save(self, commit: bool = True) -> Peer:
        peer: Peer = super().save(commit=False)
        if self.cleaned_data.get("clear_client_secret"):
            peer.client_secret = ""
        elif self.cleaned_data.get("new_client_secret"):
            peer.client_secret = self.cleaned_data["new_client_secret"]
        if self.cleaned_data.get("clear_env"):
            peer.env = {}
        elif self.cleaned_data.get("new_env") is not None:
            peer.env = self.cleaned_data["new_env"]
        if commit:
            peer.save()
            self.save_m2m()
        return peer


class CatalogEntryInline(admin.TabularInline):
    model = CatalogEntry
    fields = ("kind", "name", "upstream_name", "enabled")
    # Read-only here: switches go through the catalog's actions, which tell hosts (list_changed).
    readonly_fields = fields
    extra = 0
    can_delete = False

    def has_add_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False


class PeerHealthCheckInline(admin.TabularInline):
    model = PeerHealthCheck
    fields = ("checked_at", "ok", "latency_ms", "error")
    readonly_fields = fields
    extra = 0
    max_num = 0
    can_delete = False
    verbose_name_plural = "health history (newest first)"

    def has_add_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False


def report_sync(request: HttpRequest, peer: Peer, report: SyncReport) -> None:
    """Tell the admin what a sync found, or why it failed, in words an operator can act on."""
    found = ", ".join(f"{count} {kind.replace('_', ' ')}s" for kind, count in report.counts.items()) or "nothing"
    if report.ok:
        messages.success(request, f"Connected to '{peer.name}' ({report.protocol_version}): found {found}.")
    elif "connect" in report.errors:
        messages.error(request, f"Could not connect to '{peer.name}': {report.errors['connect']}")
    else:
        failed = "; ".join(f"{kind}: {error}" for kind, error in report.errors.items())
        messages.warning(request, f"Connected to '{peer.name}', found {found}, but some lists failed: {failed}")
    for warning in report.warnings:
        # A peer that says it is a gateway, or a marked gateway this one does not believe yet.
        messages.warning(request, f"'{peer.name}': {warning}")


def sync_and_report(request: HttpRequest, peer: Peer) -> SyncReport:
    from federation.events import publish_catalog_changed

    report = async_to_sync(peer_sync_catalog)(peer=peer)
    if report.changed:
        async_to_sync(publish_catalog_changed)(peer.name, report.changed)
    report_sync(request, peer, report)
    return report


@admin.register(Peer)
class PeerAdmin(admin.ModelAdmin):
    form = PeerAdminForm
    list_display = ("name", "transport", "enabled", "health", "circuit", "catalog_size", "last_synced_at", "last_error")
    list_filter = ("transport", "enabled", "user_oauth")
    search_fields = ("name", "url", "command")
    readonly_fields = (
        "circuit", "remote_gateway", "suggested_gateway", "protocol_version", "server_info", "capabilities", "instructions",
        "last_synced_at", "last_error", "created_at", "updated_at",
    )
    inlines = [CatalogEntryInline, PeerHealthCheckInline]
    actions = ["refresh_catalog", "enable_peers", "disable_peers"]

    @admin.display(description="health")
    def health(self, peer: Peer) -> str:
        reachable = peer.is_reachable()
        return {None: "not checked yet", True: "ok", False: "failing"}[reachable]

    @admin.display(description="circuit (this worker)")
    def circuit(self, peer: Peer) -> str:
        # Breakers live in each worker's memory: this is the state in the worker that served this page.
        state = breakers.states().get(peer.pk)
        return str(state) if state is not None else "closed (no calls yet in this worker)"

    @admin.display(description="catalog")
    def catalog_size(self, peer: Peer) -> int:
        return peer.catalog.count()

    def save_model(self, request: HttpRequest, obj: Peer, form: forms.ModelForm, change: bool) -> None:
        super().save_model(request, obj, form, change)
        # The connection test: a new peer, or one whose address or credentials changed, is synced
        # right away so the operator sees what it offers (or why it cannot be reached).
        if obj.enabled and (not change or set(SYNC_FIELDS) & set(form.changed_data)):
            # After the admin's transaction: the sync's database_sync_to_async closes connections
            # that are inside an atomic block, and the catalog must see the committed peer.
            transaction.on_commit(lambda: sync_and_report(request, obj))

    def delete_model(self, request: HttpRequest, obj: Peer) -> None:
        self.delete_queryset(request, Peer.objects.filter(pk=obj.pk))

    def delete_queryset(self, request: HttpRequest, queryset: QuerySet[Peer]) -> None:
        from federation.events import publish_catalog_changed

        names = list(queryset.values_list("name", flat=True))
        super().delete_queryset(request, queryset)
        kinds = list(CatalogKind.values)
        # Connected hosts drop the removed peers' items from their lists.
        transaction.on_commit(lambda: [async_to_sync(publish_catalog_changed)(name, kinds) for name in names])

    @admin.action(description="Refresh catalog (connect and list everything again)")
    def refresh_catalog(self, request: HttpRequest, queryset: QuerySet[Peer]) -> None:
        for peer in queryset:
            sync_and_report(request, peer)

    @admin.action(description="Enable selected peers")
    def enable_peers(self, request: HttpRequest, queryset: QuerySet[Peer]) -> None:
        names = async_to_sync(peer_set_enabled)(peer_ids=list(queryset.values_list("pk", flat=True)), enabled=True)
        messages.success(request, f"Enabled {len(names)} peer(s): {', '.join(names) or 'none changed'}.")

    @admin.action(description="Disable selected peers")
    def disable_peers(self, request: HttpRequest, queryset: QuerySet[Peer]) -> None:
        names = async_to_sync(peer_set_enabled)(peer_ids=list(queryset.values_list("pk", flat=True)), enabled=False)
        messages.success(request, f"Disabled {len(names)} peer(s): {', '.join(names) or 'none changed'}.")


@admin.register(CatalogEntry)
class CatalogEntryAdmin(admin.ModelAdmin):
    list_display = ("name", "kind", "peer", "enabled_badge", "updated_at")
    list_filter = ("kind", "enabled", "peer")
    search_fields = ("name", "upstream_name", "payload__description")
    readonly_fields = ("peer", "kind", "name", "home", "upstream_name", "position", "payload", "updated_at")
    fields = ("peer", "kind", "name", "home", "upstream_name", "enabled", "position", "payload", "updated_at")
    actions = ["enable_entries", "disable_entries"]
    list_select_related = ("peer",)

    @admin.display(description="enabled", ordering="enabled")
    def enabled_badge(self, entry: CatalogEntry) -> str:
        return format_html('<span class="fedmcp-{}">{}</span>', "on" if entry.enabled else "off", "yes" if entry.enabled else "no")

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False  # items come from the peers' own lists

    def save_model(self, request: HttpRequest, obj: CatalogEntry, form: forms.ModelForm, change: bool) -> None:
        if "enabled" in form.changed_data:
            transaction.on_commit(lambda: async_to_sync(catalog_set_enabled)(entry_ids=[obj.pk], enabled=obj.enabled))
        else:
            super().save_model(request, obj, form, change)

    def _switch(self, request: HttpRequest, queryset: QuerySet[CatalogEntry], enabled: bool) -> None:
        ids = list(queryset.values_list("pk", flat=True))
        changed = async_to_sync(catalog_set_enabled)(entry_ids=ids, enabled=enabled)
        verb = "Enabled" if enabled else "Disabled"
        if changed:
            peers = ", ".join(sorted(changed))
            messages.success(request, f"{verb} {len(ids)} item(s); connected hosts of {peers} were told the lists changed.")
        else:
            messages.info(request, f"Nothing to do: the selected items were already {verb.lower()}.")

    @admin.action(description="Enable selected items")
    def enable_entries(self, request: HttpRequest, queryset: QuerySet[CatalogEntry]) -> None:
        self._switch(request, queryset, True)

    @admin.action(description="Disable selected items (hosts get list_changed)")
    def disable_entries(self, request: HttpRequest, queryset: QuerySet[CatalogEntry]) -> None:
        self._switch(request, queryset, False)


@admin.register(RateLimit)
class RateLimitAdmin(admin.ModelAdmin):
    list_display = ("__str__", "scope", "rate_per_minute", "burst", "updated_at")
    list_filter = ("scope",)
    search_fields = ("client_id", "user__username", "peer__name")
    raw_id_fields = ("user",)
    fields = ("scope", "user", "client_id", "peer", "rate_per_minute", "burst")
