"""REST API under /api/: peers, catalog, audit, config export/import (and consent, if installed).

Every endpoint needs an OAuth access token that holds the `admin` scope *now* (DOT's
OAuth2Authentication, then `AdminToken`: its user must still be active staff), or a signed-in
staff session (for the browsable docs).
"""

from __future__ import annotations

from typing import Any

from asgiref.sync import async_to_sync
from django.contrib.auth.models import Group
from django.db.models import QuerySet
from django.http import HttpRequest, JsonResponse
from django.shortcuts import get_object_or_404
from django.urls import reverse
from django.views.decorators.csrf import csrf_exempt
from django.views.decorators.http import require_GET
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import OpenApiParameter, extend_schema, inline_serializer
from oauth2_provider.contrib.rest_framework import OAuth2Authentication
from oauth2_provider.models import AccessToken
from rest_framework import serializers, status
from rest_framework.authentication import SessionAuthentication
from rest_framework.exceptions import ValidationError
from rest_framework.pagination import PageNumberPagination
from rest_framework.permissions import BasePermission
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from console.openapi import INVALID, PAGE_PARAMETERS, AdminApiSchema
from console.services import FORMAT, SECRET_FIELDS, ConfigImportError, config_export, config_import
from federation.events import publish_catalog_changed
from federation.models import CatalogEntry, CatalogKind, Peer, Transport
from federation.services import PeerConfigError, catalog_set_enabled, peer_add, peer_remove, peer_sync_catalog
from federation.tls import check_current_ca_bundle, check_current_client_cert
from identity.consent.policy import consent_grant_revoke
from identity.hostauth import scopes
from identity.hostauth.tokens import effective_scopes
from identity.models import AuditEvent, ConsentGrant, ConsentPolicy


class StaffSession(BasePermission):
    """A staff user signed in to the admin (no token): lets the browsable docs call the API."""

    def has_permission(self, request: Request, view: APIView) -> bool:
        user = request.user
        return request.auth is None and bool(user and user.is_authenticated and user.is_staff)


class AdminToken(BasePermission):
    """An access token that holds `admin` at this moment (identity/hostauth/tokens.py `effective_scopes`).

    Not DOT's TokenHasScope, which reads the scopes the token was issued with: what the token
    holds also depends on its user, who must still be active and staff, as the request's user
    is loaded with the token on every request.
    """

    def has_permission(self, request: Request, view: APIView) -> bool:
        token = request.auth
        return isinstance(token, AccessToken) and scopes.ADMIN in effective_scopes(token)


class AdminApi(APIView):
    """Base of every API view: a token holding `admin`, or a staff session."""

    authentication_classes = [OAuth2Authentication, SessionAuthentication]
    permission_classes = [AdminToken | StaffSession]
    schema = AdminApiSchema()


API_ROOT_LINKS = ("api-peers", "api-catalog", "api-policies", "api-grants", "api-audit", "api-config-export", "api-config-import")


@require_GET
def api_root(request: HttpRequest) -> JsonResponse:
    """GET /api/: where the API's collections, schema and docs are (no data, so no token needed)."""
    return JsonResponse(
        {
            "authentication": f"Authorization: Bearer <token with the {scopes.ADMIN!r} scope>, or a signed-in staff session",
            "schema": reverse("api-schema"),
            "docs": reverse("api-docs"),
            "endpoints": {name.removeprefix("api-"): reverse(name) for name in API_ROOT_LINKS},
        }
    )


@csrf_exempt
def not_found(request: HttpRequest, **kwargs: Any) -> JsonResponse:
    """Any /api/…/ path that no view serves: DRF's 404 body, as JSON."""
    return JsonResponse({"detail": "Not found."}, status=status.HTTP_404_NOT_FOUND)


class Pagination(PageNumberPagination):
    page_size = 50
    page_size_query_param = "page_size"
    max_page_size = 500


def page_of(serializer: serializers.Serializer, name: str) -> serializers.Serializer:
    """The schema of a paginated list of `serializer` items."""
    return inline_serializer(
        name,
        fields={
            "count": serializers.IntegerField(),
            "next": serializers.CharField(allow_null=True),
            "previous": serializers.CharField(allow_null=True),
            "results": serializer,
        },
    )


def paginated(view: APIView, request: Request, queryset: QuerySet[Any], serializer: type[serializers.Serializer]) -> Response:
    paginator = Pagination()
    page = paginator.paginate_queryset(queryset, request, view=view)
    return paginator.get_paginated_response(serializer(page, many=True).data)


# --- peers -----------------------------------------------------------------------------------------

TLS_CA_HELP = "PEM CA certificates for an https/wss peer; when set, only these are trusted for it."
TLS_CERT_HELP = "PEM client certificate for peers that require mutual TLS."
TLS_KEY_HELP = "Write-only: the client certificate's PEM private key (stored encrypted)."


class PeerOutput(serializers.ModelSerializer):
    # Plain strings: the model's URL validators make drf-spectacular describe '' ambiguously (oneOf).
    url = serializers.CharField()
    token_url = serializers.CharField()
    has_client_secret = serializers.SerializerMethodField()
    has_tls_client_key = serializers.SerializerMethodField()
    env_names = serializers.SerializerMethodField()
    reachable = serializers.SerializerMethodField()
    catalog_size = serializers.SerializerMethodField()

    class Meta:
        model = Peer
        fields = (
            "id", "name", "transport", "url", "command", "args", "enabled", "is_gateway", "remote_gateway", "suggested_gateway",
            "client_id", "has_client_secret", "env_names", "token_url", "tls_ca_bundle", "tls_client_cert", "has_tls_client_key",
            "per_identity", "max_processes", "connect_timeout",
            "call_timeout", "protocol_version", "server_info", "last_synced_at", "last_error", "reachable",
            "catalog_size", "created_at", "updated_at",
        )

    def get_has_client_secret(self, peer: Peer) -> bool:
        return bool(peer.client_secret)

    def get_has_tls_client_key(self, peer: Peer) -> bool:
        return bool(peer.tls_client_key)

    def get_env_names(self, peer: Peer) -> list[str]:
        return sorted(peer.env)

    def get_reachable(self, peer: Peer) -> bool | None:
        return peer.is_reachable()

    def get_catalog_size(self, peer: Peer) -> int:
        return peer.catalog.count()


class SyncOutput(serializers.Serializer):
    peer = serializers.CharField()
    ok = serializers.BooleanField()
    protocol_version = serializers.CharField()
    counts = serializers.DictField(child=serializers.IntegerField())
    errors = serializers.DictField(child=serializers.CharField())
    changed = serializers.ListField(child=serializers.CharField())
    warnings = serializers.ListField(
        child=serializers.CharField(), help_text="What the operator should know though the sync worked (a gateway this one does not believe)."
    )


def _sync(peer: Peer) -> dict[str, Any]:
    report = async_to_sync(peer_sync_catalog)(peer=peer)
    if report.changed:
        async_to_sync(publish_catalog_changed)(peer.name, report.changed)
    return {"peer": report.peer, "ok": report.ok, "protocol_version": report.protocol_version, "counts": report.counts,
            "errors": report.errors, "changed": report.changed, "warnings": report.warnings}


class PeerListApi(AdminApi):
    class InputSerializer(serializers.Serializer):
        class Meta:
            ref_name = "PeerListInput"

        name = serializers.CharField(max_length=48)
        transport = serializers.ChoiceField(choices=Transport.choices, default=Transport.STREAMABLE_HTTP)
        url = serializers.CharField(required=False, allow_blank=True, default="")
        command = serializers.CharField(required=False, allow_blank=True, default="", help_text="stdio: the full command line.")
        env = serializers.DictField(child=serializers.CharField(), required=False, help_text="Write-only.")
        is_gateway = serializers.BooleanField(default=False)
        per_identity = serializers.BooleanField(default=False)
        max_processes = serializers.IntegerField(default=8, min_value=1)
        connect_timeout = serializers.FloatField(default=10.0, min_value=0.1)
        call_timeout = serializers.FloatField(default=60.0, min_value=0.1)
        client_id = serializers.CharField(required=False, allow_blank=True, default="")
        client_secret = serializers.CharField(required=False, allow_blank=True, default="", write_only=True, help_text="Write-only.")
        token_url = serializers.CharField(required=False, allow_blank=True, default="")
        tls_ca_bundle = serializers.CharField(required=False, allow_blank=True, default="", trim_whitespace=False, help_text=TLS_CA_HELP)
        tls_client_cert = serializers.CharField(required=False, allow_blank=True, default="", trim_whitespace=False, help_text=TLS_CERT_HELP)
        tls_client_key = serializers.CharField(
            required=False, allow_blank=True, default="", write_only=True, trim_whitespace=False, help_text=TLS_KEY_HELP
        )
        sync = serializers.BooleanField(default=True, help_text="Connect now and store the catalog (the connection test).")

    class OutputSerializer(serializers.Serializer):
        class Meta:
            ref_name = "PeerListOutput"

        peer = PeerOutput()
        sync = SyncOutput(required=False, help_text="The connection test; absent when sync was false.")

    @extend_schema(operation_id="peers_list", parameters=PAGE_PARAMETERS, responses=page_of(PeerOutput(many=True), "PeerPage"))
    def get(self, request: Request) -> Response:
        return paginated(self, request, Peer.objects.order_by("name"), PeerOutput)

    @extend_schema(operation_id="peers_create", request=InputSerializer, responses={201: OutputSerializer})
    def post(self, request: Request) -> Response:
        data = self.InputSerializer(data=request.data)
        data.is_valid(raise_exception=True)
        fields = dict(data.validated_data)
        sync = fields.pop("sync")
        try:
            peer = peer_add(**fields)
        except PeerConfigError as exc:
            raise ValidationError({"detail": str(exc)}) from exc
        report = _sync(peer) if sync else None
        peer.refresh_from_db()
        result = {"peer": peer} if report is None else {"peer": peer, "sync": report}
        return Response(self.OutputSerializer(result).data, status=status.HTTP_201_CREATED)


class PeerDetailApi(AdminApi):
    class InputSerializer(serializers.Serializer):
        class Meta:
            ref_name = "PeerDetailInput"

        url = serializers.CharField(required=False, allow_blank=True)
        enabled = serializers.BooleanField(required=False)
        connect_timeout = serializers.FloatField(required=False, min_value=0.1)
        call_timeout = serializers.FloatField(required=False, min_value=0.1)
        max_processes = serializers.IntegerField(required=False, min_value=1)
        token_url = serializers.CharField(required=False, allow_blank=True)
        tls_ca_bundle = serializers.CharField(
            required=False, allow_blank=True, trim_whitespace=False, validators=[check_current_ca_bundle], help_text=TLS_CA_HELP
        )
        tls_client_cert = serializers.CharField(
            required=False, allow_blank=True, trim_whitespace=False, validators=[check_current_client_cert], help_text=TLS_CERT_HELP
        )
        tls_client_key = serializers.CharField(
            required=False, allow_blank=True, write_only=True, trim_whitespace=False, help_text=TLS_KEY_HELP
        )

    @extend_schema(operation_id="peers_retrieve", responses=PeerOutput)
    def get(self, request: Request, peer_id: int) -> Response:
        return Response(PeerOutput(get_object_or_404(Peer, pk=peer_id)).data)

    @extend_schema(operation_id="peers_update", request=InputSerializer, responses=PeerOutput)
    def patch(self, request: Request, peer_id: int) -> Response:
        peer = get_object_or_404(Peer, pk=peer_id)
        data = self.InputSerializer(data=request.data, partial=True)
        data.is_valid(raise_exception=True)
        changes = dict(data.validated_data)
        enabled = changes.pop("enabled", None)
        for key, value in changes.items():
            setattr(peer, key, value)
        if peer.tls_client_cert and not peer.tls_client_key:
            raise ValidationError({"tls_client_key": "A client certificate needs its private key."})
        try:
            peer.full_clean()
        except Exception as exc:
            raise ValidationError({"detail": str(exc)}) from exc
        peer.save()
        if enabled is not None:
            from federation.services import peer_set_enabled

            async_to_sync(peer_set_enabled)(peer_ids=[peer.pk], enabled=enabled)
            peer.refresh_from_db()
        return Response(PeerOutput(peer).data)

    @extend_schema(operation_id="peers_destroy", responses={204: None})
    def delete(self, request: Request, peer_id: int) -> Response:
        peer = get_object_or_404(Peer, pk=peer_id)
        name = peer.name
        peer_remove(peer=peer)
        async_to_sync(publish_catalog_changed)(name, list(CatalogKind.values))
        return Response(status=status.HTTP_204_NO_CONTENT)


class PeerRefreshApi(AdminApi):
    @extend_schema(operation_id="peers_refresh", request=None, responses=SyncOutput)
    def post(self, request: Request, peer_id: int) -> Response:
        return Response(SyncOutput(_sync(get_object_or_404(Peer, pk=peer_id))).data)


# --- catalog ---------------------------------------------------------------------------------------


class CatalogOutput(serializers.ModelSerializer):
    peer = serializers.CharField(source="peer.name")
    description = serializers.SerializerMethodField()

    class Meta:
        model = CatalogEntry
        fields = ("id", "peer", "kind", "name", "home", "upstream_name", "description", "enabled", "updated_at")

    def get_description(self, entry: CatalogEntry) -> str:
        value = entry.payload.get("description", "")
        return value if isinstance(value, str) else ""


class CatalogListApi(AdminApi):
    @extend_schema(
        operation_id="catalog_list",
        parameters=[
            *PAGE_PARAMETERS,
            OpenApiParameter("peer", str, description="Peer name"),
            OpenApiParameter("kind", str, enum=list(CatalogKind.values)),
            OpenApiParameter("enabled", bool),
            OpenApiParameter("q", str, description="Substring of the name or upstream name"),
        ],
        responses=page_of(CatalogOutput(many=True), "CatalogPage"),
    )
    def get(self, request: Request) -> Response:
        rows = CatalogEntry.objects.select_related("peer")
        params = request.query_params
        if params.get("peer"):
            rows = rows.filter(peer__name=params["peer"])
        if params.get("kind"):
            rows = rows.filter(kind=params["kind"])
        if params.get("enabled") in ("true", "false"):
            rows = rows.filter(enabled=params["enabled"] == "true")
        if params.get("q"):
            rows = rows.filter(name__icontains=params["q"]) | rows.filter(upstream_name__icontains=params["q"])
        return paginated(self, request, rows.order_by("peer__name", "kind", "position", "id"), CatalogOutput)


class CatalogSwitchApi(AdminApi):
    enabled = True

    @extend_schema(request=None, responses=CatalogOutput)
    def post(self, request: Request, entry_id: int) -> Response:
        entry = get_object_or_404(CatalogEntry, pk=entry_id)
        async_to_sync(catalog_set_enabled)(entry_ids=[entry.pk], enabled=self.enabled)
        entry.refresh_from_db()
        return Response(CatalogOutput(entry).data)


class CatalogEnableApi(CatalogSwitchApi):
    enabled = True

    @extend_schema(operation_id="catalog_enable", request=None, responses=CatalogOutput)
    def post(self, request: Request, entry_id: int) -> Response:
        return super().post(request, entry_id)


class CatalogDisableApi(CatalogSwitchApi):
    enabled = False

    @extend_schema(operation_id="catalog_disable", request=None, responses=CatalogOutput)
    def post(self, request: Request, entry_id: int) -> Response:
        return super().post(request, entry_id)


# --- audit -----------------------------------------------------------------------------------------


class AuditOutput(serializers.ModelSerializer):
    class Meta:
        model = AuditEvent
        fields = (
            "id", "at", "user", "username", "federated_issuer", "federated_subject", "client_id", "via", "peer",
            "method", "name", "arguments_hash", "decision", "outcome", "error_code", "latency_ms",
        )


class AuditListApi(AdminApi):
    class FilterSerializer(serializers.Serializer):
        # As every date-time input of this API: ISO 8601, a time without an offset is UTC, and any
        # offset is converted to UTC (PostgreSQL refuses offsets past 15:59; ISO allows 23:59).
        since = serializers.DateTimeField(required=False)
        until = serializers.DateTimeField(required=False)

    @extend_schema(
        operation_id="audit_list",
        parameters=[
            *PAGE_PARAMETERS,
            OpenApiParameter("user", str, description="Username (local or federated subject)"),
            OpenApiParameter("peer", str),
            OpenApiParameter("method", str),
            OpenApiParameter("outcome", str, enum=["ok", "error", "input"], description="input: the host was answered input_required"),
            OpenApiParameter("decision", str, description="Consent decision: allow, grant, ask, approved, denied, deny, timeout"),
            OpenApiParameter("since", OpenApiTypes.DATETIME),
            OpenApiParameter("until", OpenApiTypes.DATETIME),
        ],
        responses={200: page_of(AuditOutput(many=True), "AuditPage"), 400: INVALID},
    )
    def get(self, request: Request) -> Response:
        rows = AuditEvent.objects.all()
        params = request.query_params
        if params.get("user"):
            rows = rows.filter(username=params["user"]) | rows.filter(federated_subject=params["user"])
        for key in ("peer", "method", "outcome", "decision"):
            if params.get(key):
                rows = rows.filter(**{key: params[key]})
        moments = self.FilterSerializer(data={key: params[key] for key in ("since", "until") if params.get(key)})
        moments.is_valid(raise_exception=True)
        for key, lookup in (("since", "at__gte"), ("until", "at__lt")):
            if key in moments.validated_data:
                rows = rows.filter(**{lookup: moments.validated_data[key]})
        return paginated(self, request, rows.order_by("-at", "-id"), AuditOutput)


# --- config ----------------------------------------------------------------------------------------

CONFIG_SCHEMA = inline_serializer(
    "ConfigDocument",
    fields={
        "format": serializers.ChoiceField(choices=[FORMAT]),
        "secrets_omitted": serializers.ListField(child=serializers.CharField()),
        "peers": serializers.ListField(child=serializers.DictField()),
        "rate_limits": serializers.ListField(child=serializers.DictField()),
        "policies": serializers.ListField(child=serializers.DictField()),
    },
)


class ConfigExportApi(AdminApi):
    @extend_schema(
        operation_id="config_export",
        description=f"Peers (with catalog switches), rate limits and consent policies. Left out: "
        f"{', '.join('peer.' + f for f in SECRET_FIELDS)}.",
        responses=CONFIG_SCHEMA,
    )
    def get(self, request: Request) -> Response:
        return Response(config_export())


class ConfigImportApi(AdminApi):
    class OutputSerializer(serializers.Serializer):
        class Meta:
            ref_name = "ConfigImportOutput"

        peers = serializers.IntegerField()
        catalog = serializers.IntegerField()
        rate_limits = serializers.IntegerField()
        policies = serializers.IntegerField()

    @extend_schema(operation_id="config_import", request=CONFIG_SCHEMA, responses=OutputSerializer)
    def post(self, request: Request) -> Response:
        try:
            counts = config_import(document=request.data)
        except ConfigImportError as exc:
            raise ValidationError({"detail": str(exc)}) from exc
        return Response(self.OutputSerializer(counts).data)


# --- consent policies and grants -------------------------------------------------------------------


class PolicyOutput(serializers.ModelSerializer):
    group = serializers.SlugRelatedField(slug_field="name", read_only=True, allow_null=True)

    class Meta:
        model = ConsentPolicy
        fields = (
            "id", "description", "peer", "kind", "name_pattern", "username", "group", "federated_issuer",
            "federated_subject", "client_id", "decision", "priority", "redact_fields", "enabled", "created_at",
        )


class PolicyInput(serializers.ModelSerializer):
    group = serializers.SlugRelatedField(slug_field="name", queryset=Group.objects.all(), required=False, allow_null=True)

    class Meta:
        model = ConsentPolicy
        fields = (
            "description", "peer", "kind", "name_pattern", "username", "group", "federated_issuer", "federated_subject",
            "client_id", "decision", "priority", "redact_fields", "enabled",
        )


class PolicyListApi(AdminApi):
    @extend_schema(operation_id="policies_list", parameters=PAGE_PARAMETERS, responses=page_of(PolicyOutput(many=True), "PolicyPage"))
    def get(self, request: Request) -> Response:
        return paginated(self, request, ConsentPolicy.objects.select_related("group").order_by("-priority", "id"), PolicyOutput)

    @extend_schema(operation_id="policies_create", request=PolicyInput, responses={201: PolicyOutput})
    def post(self, request: Request) -> Response:
        data = PolicyInput(data=request.data)
        data.is_valid(raise_exception=True)
        # Saving announces the change to waiting calls (identity/consent/policy.py's post_save receiver).
        policy = data.save()
        return Response(PolicyOutput(policy).data, status=status.HTTP_201_CREATED)


class PolicyDetailApi(AdminApi):
    @extend_schema(operation_id="policies_retrieve", responses=PolicyOutput)
    def get(self, request: Request, policy_id: int) -> Response:
        return Response(PolicyOutput(get_object_or_404(ConsentPolicy, pk=policy_id)).data)

    @extend_schema(operation_id="policies_update", request=PolicyInput, responses=PolicyOutput)
    def patch(self, request: Request, policy_id: int) -> Response:
        data = PolicyInput(get_object_or_404(ConsentPolicy, pk=policy_id), data=request.data, partial=True)
        data.is_valid(raise_exception=True)
        return Response(PolicyOutput(data.save()).data)

    @extend_schema(operation_id="policies_destroy", responses={204: None})
    def delete(self, request: Request, policy_id: int) -> Response:
        get_object_or_404(ConsentPolicy, pk=policy_id).delete()
        return Response(status=status.HTTP_204_NO_CONTENT)


class GrantOutput(serializers.ModelSerializer):
    # Empty for a federated identity's grant (distributed consent), which names it instead.
    user = serializers.CharField(source="user.get_username", default="")
    active = serializers.BooleanField(source="is_active")

    class Meta:
        model = ConsentGrant
        fields = (
            "id", "user", "federated_issuer", "federated_subject", "peer", "kind", "name", "client_id",
            "created_at", "expires_at", "revoked_at", "active",
        )


class GrantListApi(AdminApi):
    @extend_schema(
        operation_id="grants_list",
        parameters=[*PAGE_PARAMETERS, OpenApiParameter("user", str), OpenApiParameter("peer", str), OpenApiParameter("active", bool)],
        responses=page_of(GrantOutput(many=True), "GrantPage"),
    )
    def get(self, request: Request) -> Response:
        rows = ConsentGrant.objects.select_related("user")
        params = request.query_params
        if params.get("user"):
            rows = rows.filter(user__username=params["user"])
        if params.get("peer"):
            rows = rows.filter(peer=params["peer"])
        if params.get("active") == "true":
            rows = rows.active()
        return paginated(self, request, rows.order_by("-created_at", "-id"), GrantOutput)


class GrantRevokeApi(AdminApi):
    @extend_schema(operation_id="grants_revoke", request=None, responses=GrantOutput)
    def post(self, request: Request, grant_id: int) -> Response:
        grant = get_object_or_404(ConsentGrant, pk=grant_id)
        consent_grant_revoke(grant=grant)
        grant.refresh_from_db()
        return Response(GrantOutput(grant).data)
