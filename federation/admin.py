from django.contrib import admin

from federation.models import CatalogEntry, Peer


class CatalogEntryInline(admin.TabularInline):
    model = CatalogEntry
    fields = ("kind", "upstream_name", "enabled")
    readonly_fields = ("kind", "upstream_name")
    extra = 0
    can_delete = False


@admin.register(Peer)
class PeerAdmin(admin.ModelAdmin):
    list_display = ("name", "transport", "enabled", "protocol_version", "last_synced_at", "last_error")
    list_filter = ("transport", "enabled")
    search_fields = ("name", "url", "command")
    readonly_fields = ("protocol_version", "server_info", "capabilities", "instructions", "last_synced_at", "last_error", "created_at", "updated_at")
    inlines = [CatalogEntryInline]


@admin.register(CatalogEntry)
class CatalogEntryAdmin(admin.ModelAdmin):
    list_display = ("upstream_name", "kind", "peer", "enabled", "updated_at")
    list_filter = ("kind", "enabled", "peer")
    search_fields = ("upstream_name",)
    readonly_fields = ("peer", "kind", "upstream_name", "position", "payload", "updated_at")
