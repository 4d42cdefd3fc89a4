"""Admin form pieces that choose peers, users, clients and catalog names from what exists.

A policy or rate limit naming a peer, user or tool that does not exist never matches anything,
so a typo ("tmie", "nosuchuser") would silently do nothing: these fields offer the known values
as a list and refuse the rest with a message that says what exists.
"""

from __future__ import annotations

import fnmatch
import re
from typing import Any

from django import forms
from django.contrib.auth import get_user_model
from django.contrib.auth.models import AbstractBaseUser

from federation.models import CatalogEntry, CatalogKind, Peer

WILDCARDS = re.compile(r"[*?\[]")
MAX_LISTED = 500
"""Most suggestions one list offers (the rest are still accepted when typed)."""


class ListedInput(forms.TextInput):
    """A text input with a browser list of suggestions (`<datalist>`): pick one, or type a pattern."""

    def __init__(self, options: Any = (), attrs: dict[str, Any] | None = None) -> None:
        super().__init__(attrs)
        self.options = options

    def get_context(self, name: str, value: Any, attrs: dict[str, Any] | None) -> dict[str, Any]:
        context = super().get_context(name, value, attrs)
        context["widget"]["attrs"]["list"] = f"{context['widget']['attrs'].get('id', name)}-options"
        return context

    def render(self, name: str, value: Any, attrs: dict[str, Any] | None = None, renderer: Any = None) -> Any:
        from django.utils.html import format_html, format_html_join

        html = super().render(name, value, attrs, renderer)
        list_id = f"{(attrs or {}).get('id', name)}-options"
        options = list(self.options() if callable(self.options) else self.options)[:MAX_LISTED]
        return format_html("{}<datalist id=\"{}\">{}</datalist>", html, list_id, format_html_join("", "<option value=\"{}\">", ((o,) for o in options)))


def peer_names() -> list[str]:
    return list(Peer.objects.order_by("name").values_list("name", flat=True))


def peer_choices(current: str = "") -> list[tuple[str, str]]:
    """Every peer, and `current` if it names one since removed (so other edits still save)."""
    names = peer_names()
    choices = [("", "any peer")] + [(n, n) for n in names]
    if current and current not in names:
        choices.append((current, f"{current} (no such peer now)"))
    return choices


def usernames() -> list[str]:
    users = get_user_model()
    return list(users.objects.order_by(users.USERNAME_FIELD).values_list(users.USERNAME_FIELD, flat=True)[:MAX_LISTED])


def user_named(username: str) -> AbstractBaseUser:
    """The user called `username`.

    Raises:
        ValidationError: there is none (the message lists some that exist).
    """
    users = get_user_model()
    user = users.objects.filter(**{users.USERNAME_FIELD: username}).first()
    if user is None:
        known = ", ".join(usernames()[:10]) or "none yet"
        raise forms.ValidationError(f"There is no user '{username}'. Users: {known}.")
    return user


def client_ids() -> list[str]:
    from oauth2_provider.models import Application

    return list(Application.objects.order_by("name").values_list("client_id", flat=True)[:MAX_LISTED])


def catalog_names(peer: str = "", kinds: tuple[str, ...] = ()) -> list[str]:
    """The names peers know their items by (what policies match), of `peer` if given."""
    rows = CatalogEntry.objects.all()
    if peer:
        rows = rows.filter(peer__name=peer)
    if kinds:
        rows = rows.filter(kind__in=kinds)
    return sorted(set(rows.values_list("upstream_name", flat=True)[: MAX_LISTED * 4]))[:MAX_LISTED]


def _template_matches(template: str, uri: str) -> bool:
    pattern = "".join(".*" if part.startswith("{") else re.escape(part) for part in re.split(r"(\{[^{}]*\})", template))
    return re.fullmatch(pattern, uri) is not None


def check_name_pattern(pattern: str, *, peer: str, kind: str) -> None:
    """Refuse a name without wildcards that no item of `peer` (any peer if blank) is called.

    Policy `kind`s map to catalog kinds: tools, prompts, resources (and URIs a resource template
    makes); sampling and elicitation name the tool during whose call the upstream asks.

    Raises:
        ValidationError: the name matches nothing (the message lists what exists).
    """
    if not pattern or WILDCARDS.search(pattern):
        return
    kinds = {
        "tool": (CatalogKind.TOOL,), "sampling": (CatalogKind.TOOL,), "elicitation": (CatalogKind.TOOL,),
        "prompt": (CatalogKind.PROMPT,), "resource": (CatalogKind.RESOURCE, CatalogKind.RESOURCE_TEMPLATE),
    }.get(kind, (CatalogKind.TOOL, CatalogKind.PROMPT, CatalogKind.RESOURCE, CatalogKind.RESOURCE_TEMPLATE))
    rows = CatalogEntry.objects.filter(kind__in=kinds)
    if peer:
        rows = rows.filter(peer__name=peer)
    if rows.filter(upstream_name=pattern).exists():
        return
    templates = rows.filter(kind=CatalogKind.RESOURCE_TEMPLATE).values_list("upstream_name", flat=True)
    if any(_template_matches(t, pattern) for t in templates[:MAX_LISTED]):
        return
    known = sorted(set(rows.values_list("upstream_name", flat=True)[:50]))
    close = [n for n in known if fnmatch.fnmatch(n.lower(), f"*{pattern.lower()[:3]}*")][:5] or known[:10]
    where = f"peer '{peer}'" if peer else "any peer"
    what = {"tool": "tool", "prompt": "prompt", "resource": "resource"}.get(kind, "item")
    raise forms.ValidationError(
        f"No {what} of {where} is called '{pattern}'. Known: {', '.join(close) or 'none (refresh the peer first)'}. "
        "Use * or ? for a pattern."
    )
