import json
import shlex
from typing import Any

from asgiref.sync import async_to_sync
from django import forms
from django.contrib import admin, messages
from django.core.exceptions import PermissionDenied, ValidationError
from django.db import transaction
from django.db.models import QuerySet
from django.http import HttpRequest, HttpResponse, HttpResponseRedirect
from django.shortcuts import get_object_or_404
from django.template.response import TemplateResponse
from django.urls import URLPattern, path, reverse
from django.utils.html import format_html, format_html_join

from console.schema import schema_rows
from federation.health import breakers
from federation.models import CatalogEntry, CatalogKind, Peer, PeerHealthCheck, RateLimit, Transport, peer_name_validator
from federation.services import (
    PeerConfigError,
    SyncReport,
    catalog_set_enabled,
    env_parse,
    peer_add,
    peer_connect_first,
    peer_probe,
    peer_set_enabled,
    peer_sync_catalog,
)
from federation.tls import check_current, validate_client_key


def _env_lines(text: str) -> dict[str, str]:
    """An environment typed one KEY=VALUE per line."""
    try:
        return env_parse(text.splitlines())
    except PeerConfigError as exc:
        raise forms.ValidationError(f"Write one KEY=VALUE per line: {exc}.") from exc


SYNC_FIELDS = (
    "transport", "url", "command_line", "is_gateway", "client_id", "token_url", "tls_ca_bundle", "tls_client_cert",
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
    command_line = forms.CharField(
        label="Command line", required=False, max_length=2000, widget=forms.TextInput(attrs={"size": 70}),
        help_text="stdio peers: as you would type it in a shell (`uvx mcp-server-fetch`, `npx -y @scope/server --flag`).",
    )

    class Meta:
        model = Peer
        # What a sync learns of a gateway peer is shown, never edited: believing one is for
        # `is_gateway` and the trust records (identity/trust/gateways.py `peer_gateway_standing`).
        # The command and its arguments are edited as one command line.
        exclude = ["client_secret", "env", "tls_client_key", "remote_gateway", "suggested_gateway", "command", "args"]

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if self.instance.pk and self.instance.command:
            self.initial["command_line"] = shlex.join([self.instance.command, *self.instance.args])
        if self.instance.pk:
            stored = "a secret is stored" if self.instance.client_secret else "no secret is stored"
            self.fields["new_client_secret"].help_text += f" (Now: {stored}.)"
            names = ", ".join(sorted(self.instance.env)) or "none"
            self.fields["new_env"].help_text += f" (Now stored: {names}; values are not shown.)"
            stored = "a key is stored" if self.instance.tls_client_key else "no key is stored"
            self.fields["new_tls_client_key"].help_text += f" (Now: {stored}.)"

    def clean(self) -> dict[str, Any]:
        cleaned = super().clean()
        transport = cleaned.get("transport")
        if transport == Transport.STDIO:
            try:
                parts = shlex.split(cleaned.get("command_line") or "")
            except ValueError as exc:
                self.add_error("command_line", f"Cannot read this command line: {exc}.")
                parts = None
            if parts == []:
                self.add_error("command_line", "A stdio peer needs the command line that starts it.")
            elif parts:
                self.instance.command, self.instance.args = parts[0], parts[1:]
        elif transport and not cleaned.get("url"):
            self.add_error("url", f"A {Transport(transport).label} peer needs the URL of its MCP endpoint.")
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
        return _env_lines(text)

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


HTTP_TRANSPORTS = (Transport.STREAMABLE_HTTP, Transport.SSE, Transport.WEBSOCKET)
STDIO_FIELDS = ("command", "env", "max_processes")
BLANK: dict[str, Any] = {"env": {}, "per_identity": False, "max_processes": 8, "is_gateway": False, "user_oauth": False}
"""What a field of another transport is taken as (others: empty text)."""
HTTP_FIELDS = ("url", "is_gateway", "client_id", "client_secret", "token_url", "user_oauth", "tls_ca_bundle", "tls_client_cert", "tls_client_key")


class PeerAddForm(forms.Form):
    """Add a peer as `manage.py peer add` does: the transport first, then only its fields; a stdio
    server as a command line. What the fields mean and how they are checked is `peer_add`'s."""

    name = forms.CharField(
        max_length=48, validators=[peer_name_validator],
        help_text="Lowercase letters, digits and single hyphens; hosts see its tools as NAME__tool.",
    )
    transport = forms.ChoiceField(choices=Transport.choices, initial=Transport.STREAMABLE_HTTP)
    url = forms.CharField(
        label="URL", required=False, max_length=2000,
        help_text="The server's MCP endpoint, e.g. https://mcp.example.com/mcp (ws:// or wss:// for WebSocket).",
    )
    command = forms.CharField(
        label="Command line", required=False, max_length=2000,
        widget=forms.TextInput(attrs={"size": 70, "placeholder": "mcp-server-time --local-timezone UTC"}),
        help_text="As you would type it in a shell, e.g. `mcp-server-time`, `uvx mcp-server-fetch` or "
        "`npx -y @modelcontextprotocol/server-everything`. Programs are looked up in the gateway's virtualenv, "
        "then on PATH; npx and uvx download the server on its first start (the first connect waits up to 120 s).",
    )
    env = forms.CharField(
        label="Environment", required=False, widget=forms.Textarea(attrs={"rows": 3}),
        help_text="KEY=VALUE per line (API keys the server reads); stored encrypted, never shown again.",
    )
    per_identity = forms.BooleanField(required=False, help_text=Peer._meta.get_field("per_identity").help_text)
    max_processes = forms.IntegerField(required=False, min_value=1, initial=8, help_text=Peer._meta.get_field("max_processes").help_text)
    is_gateway = forms.BooleanField(label="Another fedmcp gateway", required=False, help_text=Peer._meta.get_field("is_gateway").help_text)
    client_id = forms.CharField(required=False, max_length=255, help_text="With a peer gateway: the client id this gateway has there.")
    client_secret = forms.CharField(required=False, widget=forms.PasswordInput(render_value=False), help_text="Its secret (stored encrypted).")
    token_url = forms.CharField(label="Token URL", required=False, max_length=2000, help_text="Discovered from the peer's metadata when blank.")
    user_oauth = forms.BooleanField(label="Per-user OAuth", required=False, help_text=Peer._meta.get_field("user_oauth").help_text)
    tls_ca_bundle = PemField(label="TLS CA bundle", help_text=Peer._meta.get_field("tls_ca_bundle").help_text)
    tls_client_cert = PemField(label="TLS client certificate", help_text=Peer._meta.get_field("tls_client_cert").help_text)
    tls_client_key = PemField(label="TLS client key", help_text="PEM private key of the client certificate (stored encrypted).")
    connect_timeout = forms.FloatField(
        required=False, min_value=0.1,
        help_text="Seconds to connect and handshake. Blank: 10 (120 for the first start of an npx/uvx server).",
    )
    call_timeout = forms.FloatField(initial=60.0, min_value=0.1, help_text="Seconds one call may take.")
    force = forms.BooleanField(
        label="Keep it even if it cannot be reached now", required=False,
        help_text="Otherwise a peer whose first connection fails is not added.",
    )

    def clean_env(self) -> dict[str, str]:
        return _env_lines(self.cleaned_data["env"])

    def clean(self) -> dict[str, Any]:
        cleaned = super().clean()
        transport = cleaned.get("transport")
        if transport in HTTP_TRANSPORTS and not cleaned.get("url"):
            self.add_error("url", f"A {Transport(transport).label} peer needs the URL of its MCP endpoint.")
        if transport == Transport.STDIO and not (cleaned.get("command") or "").strip():
            self.add_error("command", "A stdio peer needs the command line that starts it.")
        # The fields of the other transports are left out (the page hides them; without
        # JavaScript they may still hold text).
        for name in HTTP_FIELDS if transport == Transport.STDIO else STDIO_FIELDS:
            cleaned[name] = BLANK.get(name, "")
        return cleaned

    def service_arguments(self) -> dict[str, Any]:
        """The arguments of `peer_add`."""
        data = self.cleaned_data
        return {
            "name": data["name"], "transport": data["transport"], "url": data["url"], "command": data["command"], "env": data["env"],
            "connect_timeout": data["connect_timeout"] if data["connect_timeout"] is not None else 10.0,
            "call_timeout": data["call_timeout"], "is_gateway": data["is_gateway"], "per_identity": data["per_identity"],
            "max_processes": data["max_processes"] or 8, "client_id": data["client_id"], "client_secret": data["client_secret"],
            "token_url": data["token_url"], "user_oauth": data["user_oauth"], "tls_ca_bundle": data["tls_ca_bundle"],
            "tls_client_cert": data["tls_client_cert"], "tls_client_key": data["tls_client_key"],
        }

    def groups(self) -> list[tuple[str, str, list[forms.BoundField]]]:
        """(title, the transports it is for, its fields) for the template."""
        http = " ".join(HTTP_TRANSPORTS)
        return [
            ("", "", [self[n] for n in ("name", "transport")]),
            ("Where it is", http, [self["url"]]),
            ("How it starts", Transport.STDIO, [self[n] for n in STDIO_FIELDS]),
            ("Upstream sessions", "", [self["per_identity"]]),
            ("Authentication and TLS", http, [self[n] for n in HTTP_FIELDS if n != "url"]),
            ("Timeouts", "", [self["connect_timeout"], self["call_timeout"]]),
            ("", "", [self["force"]]),
        ]


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


def catalog_items(entries: Any) -> list[dict[str, Any]]:
    """What the peer page shows of each catalog item: name, description, its input rendered."""
    items = []
    for entry in entries:
        payload = entry.payload if isinstance(entry.payload, dict) else {}
        description = payload.get("description") if isinstance(payload.get("description"), str) else ""
        item: dict[str, Any] = {"entry": entry, "description": description, "title": payload.get("title") or ""}
        if entry.kind == CatalogKind.TOOL:
            item["rows"] = schema_rows(payload.get("inputSchema"))
        elif entry.kind == CatalogKind.PROMPT:
            arguments = payload.get("arguments") if isinstance(payload.get("arguments"), list) else []
            item["prompt_arguments"] = [a for a in arguments if isinstance(a, dict)]
        else:
            item["mime_type"] = payload.get("mimeType") or ""
        item["json"] = json.dumps(payload, indent=2, ensure_ascii=False)
        items.append(item)
    return items


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
    fieldsets = (
        (None, {"fields": ("name", "transport", "enabled")}),
        ("Where it is", {"fields": ("url",), "classes": ("fedmcp-http",)}),
        ("How it starts", {"fields": ("command_line", "new_env", "clear_env", "max_processes"), "classes": ("fedmcp-stdio",)}),
        ("Upstream sessions", {"fields": ("per_identity",)}),
        ("Authentication and TLS", {
            "fields": (
                "is_gateway", "client_id", "new_client_secret", "clear_client_secret", "token_url", "user_oauth", "tls_ca_bundle",
                "tls_client_cert", "new_tls_client_key", "clear_tls_client_key",
            ),
            "classes": ("fedmcp-http",),
        }),
        ("Timeouts", {"fields": ("connect_timeout", "call_timeout")}),
        ("What the last connection learned", {
            "fields": (
                "circuit", "protocol_version", "server_info", "capabilities", "instructions", "remote_gateway", "suggested_gateway",
                "last_synced_at", "last_error", "created_at", "updated_at",
            ),
            "classes": ("collapse",),
        }),
    )
    # The catalog is shown readable below the form (templates/admin/federation/peer/change_form.html).
    inlines = [PeerHealthCheckInline]
    actions = ["refresh_catalog", "enable_peers", "disable_peers"]
    change_form_template = "admin/federation/peer/change_form.html"

    def get_urls(self) -> list[URLPattern]:
        view = self.admin_site.admin_view
        return [
            path("<int:peer_id>/test/", view(self.test_view), name="federation_peer_test"),
            path("<int:peer_id>/refresh/", view(self.refresh_view), name="federation_peer_refresh"),
            path("<int:peer_id>/catalog/<int:entry_id>/switch/", view(self.switch_view), name="federation_peer_catalog_switch"),
            *super().get_urls(),
        ]

    # --- adding: the CLI's rule (federation/services.py `peer_add`, `peer_connect_first`) ------

    def add_view(self, request: HttpRequest, form_url: str = "", extra_context: dict[str, Any] | None = None) -> HttpResponse:
        """Add a peer and connect to it at once; one that cannot be reached is not added (unless forced).

        Not the admin's generic add view: that saves first and reports after, inside a
        transaction the first connection cannot run in, and says "added successfully" beside
        a failed connection.
        """
        if not self.has_add_permission(request):
            raise PermissionDenied
        form = PeerAddForm(request.POST if request.method == "POST" else None)
        diagnostics = ""
        if request.method == "POST" and form.is_valid():
            try:
                peer = peer_add(**form.service_arguments())
            except PeerConfigError as exc:
                form.add_error(None, f"The peer was not added: {exc}.")
            else:
                if peer.user_oauth:
                    return self._added_user_oauth(request, peer)
                first = async_to_sync(peer_connect_first)(
                    peer=peer, force=form.cleaned_data["force"], connect_timeout_chosen=form.cleaned_data["connect_timeout"] is not None
                )
                if first.kept:
                    self.log_addition(request, peer, [{"added": {}}])
                    for note in first.notes:
                        messages.info(request, note)
                    report_sync(request, peer, first.report)
                    if not first.connected:
                        messages.warning(request, f"'{peer.name}' was kept as asked, though it cannot be reached now: use Test or Refresh once it is up.")
                    return HttpResponseRedirect(reverse("admin:federation_peer_change", args=[peer.pk]))
                diagnostics = first.report.diagnostics
                form.add_error(
                    None,
                    f"Could not reach '{peer.name}': {first.report.errors['connect']}. The peer was not added: fix the "
                    f"{'command line' if peer.transport == Transport.STDIO else 'URL'} and try again, or tick "
                    "“Keep it even if it cannot be reached now”.",
                )
        context = {
            **self.admin_site.each_context(request),
            "title": "Add peer",
            "opts": self.opts,
            "form": form,
            "diagnostics": diagnostics,
            "transport_groups": form.groups(),
            **(extra_context or {}),
        }
        return TemplateResponse(request, "admin/federation/peer/add_peer.html", context)

    def _added_user_oauth(self, request: HttpRequest, peer: Peer) -> HttpResponse:
        from federation import upstream_oauth

        self.log_addition(request, peer, [{"added": {}}])
        upstream_oauth.oauth_client_configure(peer=peer)
        try:
            client = async_to_sync(upstream_oauth.oauth_client_discover)(peer=peer)
        except upstream_oauth.UpstreamOAuthError as exc:
            messages.warning(request, f"Added '{peer.name}', but could not discover how it is authorized: {exc}")
        else:
            messages.success(request, f"Added '{peer.name}'; its authorization server is {client.issuer}.")
        where = upstream_oauth.connect_page_url(upstream_oauth.public_base() or request.build_absolute_uri("/").rstrip("/"), peer.name)
        messages.info(request, f"Users connect their accounts at {where}; the catalog is listed when the first one connects.")
        return HttpResponseRedirect(reverse("admin:federation_peer_change", args=[peer.pk]))

    # --- the peer page: Test, Refresh, the catalog ----------------------------------------------

    def change_view(self, request: HttpRequest, object_id: str, form_url: str = "", extra_context: dict[str, Any] | None = None) -> HttpResponse:
        peer = self.get_object(request, object_id)
        extra = dict(extra_context or {})
        if peer is not None:
            extra["catalog"] = catalog_items(peer.catalog.all())
            extra["can_switch"] = self.has_change_permission(request, peer)
        return super().change_view(request, object_id, form_url, extra)

    def _peer_for_action(self, request: HttpRequest, peer_id: int) -> Peer:
        peer = get_object_or_404(Peer, pk=peer_id)
        if request.method != "POST" or not self.has_change_permission(request, peer):
            raise PermissionDenied
        return peer

    def _back(self, peer: Peer) -> HttpResponse:
        return HttpResponseRedirect(reverse("admin:federation_peer_change", args=[peer.pk]))

    def test_view(self, request: HttpRequest, peer_id: int) -> HttpResponse:
        """Check the peer's health now and say how it went."""
        peer = self._peer_for_action(request, peer_id)
        result = async_to_sync(peer_probe)(peer=peer)
        if result.ok:
            messages.success(request, f"Test of '{peer.name}': reachable, answered in {round(result.latency_ms or 0)} ms.")
        else:
            messages.error(request, f"Test of '{peer.name}' failed: {result.error}")
            if result.diagnostics:
                messages.error(request, f"It wrote to stderr: {result.diagnostics[-2000:]}")
        return self._back(peer)

    def refresh_view(self, request: HttpRequest, peer_id: int) -> HttpResponse:
        """List the peer's catalog again (hosts hear of changes)."""
        peer = self._peer_for_action(request, peer_id)
        sync_and_report(request, peer)
        return self._back(peer)

    def switch_view(self, request: HttpRequest, peer_id: int, entry_id: int) -> HttpResponse:
        """Switch one catalog item on or off (hosts get list_changed)."""
        peer = self._peer_for_action(request, peer_id)
        entry = get_object_or_404(CatalogEntry, pk=entry_id, peer=peer)
        enabled = request.POST.get("enabled") == "1"
        async_to_sync(catalog_set_enabled)(entry_ids=[entry.pk], enabled=enabled)
        messages.success(request, f"{'Enabled' if enabled else 'Disabled'} {entry.get_kind_display().lower()} '{entry.name}'; connected hosts were told.")
        return HttpResponseRedirect(reverse("admin:federation_peer_change", args=[peer.pk]) + f"#catalog-{entry.pk}")

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
    readonly_fields = ("peer", "kind", "name", "home", "upstream_name", "description", "takes", "position", "payload", "updated_at")
    fieldsets = (
        (None, {"fields": ("peer", "kind", "name", "enabled", "description", "takes")}),
        ("Where it comes from", {"fields": ("home", "upstream_name", "position", "updated_at")}),
        ("As the peer lists it (JSON)", {"fields": ("payload",), "classes": ("collapse",)}),
    )

    @admin.display(description="description")
    def description(self, entry: CatalogEntry) -> str:
        payload = entry.payload if isinstance(entry.payload, dict) else {}
        return payload.get("description") if isinstance(payload.get("description"), str) else "-"

    @admin.display(description="takes")
    def takes(self, entry: CatalogEntry) -> str:
        """The input schema (tools) or arguments (prompts) as a table."""
        item = catalog_items([entry])[0]
        if item.get("rows"):
            rows = format_html_join(
                "", "<tr><td style=\"padding-left:{}rem\"><code>{}</code></td><td>{}</td><td>{}</td><td>{} {}</td></tr>",
                ((r.depth + 0.5, r.name, r.type, "required" if r.required else "optional", r.description, r.details) for r in item["rows"]),
            )
        elif item.get("prompt_arguments"):
            rows = format_html_join(
                "", "<tr><td><code>{}</code></td><td>string</td><td>{}</td><td>{}</td></tr>",
                ((a.get("name", ""), "required" if a.get("required") else "optional", a.get("description", "")) for a in item["prompt_arguments"]),
            )
        else:
            return "-"
        return format_html('<table class="schema"><tr><th>argument</th><th>type</th><th></th><th>description</th></tr>{}</table>', rows)
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


class RateLimitForm(forms.ModelForm):
    """The user is named, not given by id; unknown users and clients are refused."""

    username = forms.CharField(
        label="User", required=False, help_text="Identity rules: this user only (blank: any user). Pick from the list."
    )

    class Meta:
        model = RateLimit
        fields = ("scope", "client_id", "peer", "rate_per_minute", "burst")

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        from console import forms as listed

        super().__init__(*args, **kwargs)
        self.fields["username"].widget = listed.ListedInput(listed.usernames)
        self.fields["client_id"].widget = listed.ListedInput(listed.client_ids)
        if self.instance.user_id:
            self.initial["username"] = self.instance.user.get_username()
        self.order_fields(["scope", "username", "client_id", "peer", "rate_per_minute", "burst"])

    def clean_username(self) -> Any:
        from console.forms import user_named

        username = self.cleaned_data["username"].strip()
        return user_named(username) if username else None

    def clean_client_id(self) -> str:
        from oauth2_provider.models import Application

        client_id = self.cleaned_data["client_id"].strip()
        if client_id and not Application.objects.filter(client_id=client_id).exists():
            raise forms.ValidationError(f"No OAuth client has the id '{client_id}'; pick one from the list.")
        return client_id

    def _post_clean(self) -> None:
        # Before the model's validation, which checks the user against the scope.
        self.instance.user = self.cleaned_data.get("username") if "username" in self.cleaned_data else self.instance.user
        super()._post_clean()


@admin.register(RateLimit)
class RateLimitAdmin(admin.ModelAdmin):
    form = RateLimitForm
    list_display = ("__str__", "scope", "rate_per_minute", "burst", "updated_at")
    list_filter = ("scope",)
    search_fields = ("client_id", "user__username", "peer__name")
    fields = ("scope", "username", "client_id", "peer", "rate_per_minute", "burst")
