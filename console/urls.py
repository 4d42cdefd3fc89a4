"""URLs of the console: the admin dashboard and the REST API with its OpenAPI schema and docs."""

from django.contrib import admin
from django.urls import path, re_path
from drf_spectacular.views import SpectacularAPIView, SpectacularSwaggerView

from console import api, dashboard, playground

urlpatterns = [
    # Before admin.site.urls, so the admin's catch-all does not take them.
    path("admin/dashboard/", admin.site.admin_view(dashboard.dashboard), name="console-dashboard"),
    path("admin/dashboard/data", admin.site.admin_view(dashboard.dashboard_data), name="console-dashboard-data"),
    path("admin/playground/", admin.site.admin_view(playground.playground), name="console-playground"),
    path("admin/playground/<int:entry_id>/", admin.site.admin_view(playground.playground_item), name="console-playground-item"),
    path("api/", api.api_root, name="api-root"),
    path("api/peers/", api.PeerListApi.as_view(), name="api-peers"),
    path("api/peers/<int:peer_id>/", api.PeerDetailApi.as_view(), name="api-peer"),
    path("api/peers/<int:peer_id>/refresh/", api.PeerRefreshApi.as_view(), name="api-peer-refresh"),
    path("api/catalog/", api.CatalogListApi.as_view(), name="api-catalog"),
    path("api/catalog/<int:entry_id>/enable/", api.CatalogEnableApi.as_view(), name="api-catalog-enable"),
    path("api/catalog/<int:entry_id>/disable/", api.CatalogDisableApi.as_view(), name="api-catalog-disable"),
    path("api/policies/", api.PolicyListApi.as_view(), name="api-policies"),
    path("api/policies/<int:policy_id>/", api.PolicyDetailApi.as_view(), name="api-policy"),
    path("api/grants/", api.GrantListApi.as_view(), name="api-grants"),
    path("api/grants/<int:grant_id>/revoke/", api.GrantRevokeApi.as_view(), name="api-grant-revoke"),
    path("api/audit/", api.AuditListApi.as_view(), name="api-audit"),
    path("api/config/export", api.ConfigExportApi.as_view(), name="api-config-export"),
    path("api/config/import", api.ConfigImportApi.as_view(), name="api-config-import"),
    path("api/schema/", SpectacularAPIView.as_view(), name="api-schema"),
    path("api/docs/", SpectacularSwaggerView.as_view(url_name="api-schema"), name="api-docs"),
    # Last: any other /api/…/ path (e.g. a negative id, which <int:> does not match) answers a JSON
    # 404 like the views' own, not the HTML page. Only paths ending in "/", so APPEND_SLASH still
    # redirects /api/peers to /api/peers/.
    re_path(r"^api/.*/$", api.not_found, name="api-not-found"),
]
