from typing import Any

from django import forms
from django.contrib import admin

from federation.models import CatalogEntry, Peer, RateLimit


class PeerAdminForm(forms.ModelForm):
    """Peer form whose secrets are write-only: the client secret and the stdio environment
    (which often holds API keys) are never rendered back; blank inputs keep what is stored."""

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

    class Meta:
        model = Peer
        exclude = ["client_secret", "env"]

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if self.instance.pk:
            stored = "a secret is stored" if self.instance.client_secret else "no secret is stored"
            self.fields["new_client_secret"].help_text += f" (Now: {stored}.)"
            names = ", ".join(sorted(self.instance.env)) or "none"
            self.fields["new_env"].help_text += f" (Now stored: {names}; values are not shown.)"

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
    fields = ("kind", "upstream_name", "enabled")
    readonly_fields = ("kind", "upstream_name")
    extra = 0
    can_delete = False


@admin.register(Peer)
class PeerAdmin(admin.ModelAdmin):
    form = PeerAdminForm
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


@admin.register(RateLimit)
class RateLimitAdmin(admin.ModelAdmin):
    list_display = ("__str__", "scope", "rate_per_minute", "burst", "updated_at")
    list_filter = ("scope",)
    search_fields = ("client_id", "user__username", "peer__name")
    raw_id_fields = ("user",)
    fields = ("scope", "user", "client_id", "peer", "rate_per_minute", "burst")
