"""A staff user signed in to the admin through the Django test client."""

from __future__ import annotations

from django.contrib.auth import get_user_model
from django.test import Client

from tests.base import HOST

STAFF = "operator"


def staff_client() -> Client:
    """Sign in a superuser (created if needed) and return the client."""
    users = get_user_model()
    user = users.objects.filter(username=STAFF).first() or users.objects.create_superuser(STAFF, password="x-not-used")
    client = Client(headers={"host": HOST})
    client.force_login(user)
    return client


def messages_of(response: object) -> list[tuple[str, str]]:
    """The (level tag, text) of the admin messages a followed response shows."""
    return [(m.level_tag, str(m)) for m in response.context["messages"]]  # type: ignore[attr-defined]
