"""The applications a user authorised over OAuth, as that user sees them, and revoking one.

An "authorisation" is what DOT keeps for one user and one application: access tokens, refresh
tokens and unspent authorization codes. The user's page (/consent/applications) lists them per
application; revoking deletes them all, so the application's next request with any of its
tokens is refused (401) and it has to ask the user again.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from django.db import transaction
from django.utils import timezone
from oauth2_provider.models import AccessToken, Grant, RefreshToken

from identity.hostauth import scopes as scope_names


@dataclass(frozen=True)
class Authorization:
    """One application the user authorised: what it may do, since when, until when."""

    application_id: int
    name: str
    scopes: tuple[str, ...]
    since: datetime
    until: datetime | None
    """When its last access token expires; None while a refresh token can renew it."""

    def described_scopes(self) -> list[tuple[str, str]]:
        """(scope, what it lets the application do) for each scope, in words a person reads."""
        return [(scope, scope_names.SCOPES.get(scope, scope)) for scope in self.scopes]


def authorizations_for(user: Any) -> list[Authorization]:
    """Return the applications holding live tokens or unrevoked refresh tokens of `user`, by name."""
    now = timezone.now()
    rows: dict[int, dict[str, Any]] = {}

    def row(application: Any, created: datetime) -> dict[str, Any]:
        blank = {"name": application.name or application.client_id, "scopes": set(), "since": created, "until": None, "renews": False}
        entry = rows.setdefault(application.pk, blank)
        entry["since"] = min(entry["since"], created)
        return entry

    for token in AccessToken.objects.filter(user=user, expires__gt=now, application__isnull=False).select_related("application"):
        entry = row(token.application, token.created)
        entry["scopes"].update(token.scope.split())
        entry["until"] = max(entry["until"] or token.expires, token.expires)
    for refresh in RefreshToken.objects.filter(user=user, revoked__isnull=True, application__isnull=False).select_related("application", "access_token"):
        entry = row(refresh.application, refresh.created)
        entry["renews"] = True
        if refresh.access_token is not None:
            entry["scopes"].update(refresh.access_token.scope.split())
    return sorted(
        (
            Authorization(pk, e["name"], tuple(sorted(e["scopes"])), e["since"], None if e["renews"] else e["until"])
            for pk, e in rows.items()
        ),
        key=lambda a: (a.name.lower(), a.application_id),
    )


def authorization_revoke(*, user: Any, application_id: int) -> int:
    """Delete every token and unspent code `application_id` holds for `user`; return how many tokens went.

    Deleting (not marking) the access tokens is what makes the next request fail at once: the
    token caches are invalidated by the deletion (fedmcp_lib/caching.py) in every process.
    """
    with transaction.atomic():
        refresh = RefreshToken.objects.filter(user=user, application_id=application_id)
        access = AccessToken.objects.filter(user=user, application_id=application_id)
        count = access.count() + refresh.filter(revoked__isnull=True).count()
        # Refresh tokens first: each points at its access token, and DOT's own revoke deletes both.
        refresh.delete()
        access.delete()
        Grant.objects.filter(user=user, application_id=application_id).delete()
    return count
