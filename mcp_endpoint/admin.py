from django.contrib import admin

from mcp_endpoint.models import McpSession, ResourceSubscription


@admin.register(McpSession)
class McpSessionAdmin(admin.ModelAdmin):
    list_display = ("id", "transport", "scope", "protocol_version", "created_at", "last_seen_at", "closed_at")
    list_filter = ("transport", "protocol_version")
    readonly_fields = [f.name for f in McpSession._meta.fields]


@admin.register(ResourceSubscription)
class ResourceSubscriptionAdmin(admin.ModelAdmin):
    list_display = ("session", "uri", "peer_name", "created_at")
