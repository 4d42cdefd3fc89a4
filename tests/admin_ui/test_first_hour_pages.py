"""What a newcomer types after reading the README: the paths it names, the icon, the health probe."""

from __future__ import annotations

import pytest
from django.test import Client


@pytest.mark.django_db
@pytest.mark.parametrize(
    ("typed", "page"),
    [("/consent/", "/consent"), ("/consent/grants/", "/consent/grants"), ("/connect/", "/connect")],
)
def test_the_pages_answer_with_a_trailing_slash_too(typed: str, page: str) -> None:
    response = Client().get(typed + "?x=1")

    assert response.status_code == 302
    assert response["Location"] == page + "?x=1"
    # and the page itself is there (a sign-in first, for an anonymous visitor)
    assert Client().get(page).status_code in (200, 302)


@pytest.mark.django_db
def test_api_root_says_where_things_are_without_a_token() -> None:
    response = Client().get("/api/")

    assert response.status_code == 200
    body = response.json()
    assert body["docs"] == "/api/docs/" and body["schema"] == "/api/schema/"
    assert body["endpoints"]["peers"] == "/api/peers/"
    assert "admin" in body["authentication"]


@pytest.mark.django_db
def test_the_api_collections_still_need_a_token() -> None:
    assert Client().get("/api/peers/").status_code == 401


@pytest.mark.django_db
def test_favicon_ico_is_an_icon() -> None:
    response = Client().get("/favicon.ico")

    assert response.status_code == 200
    assert response["Content-Type"] == "image/x-icon"
    assert response.content[:4] == b"\x00\x00\x01\x00"  # ICONDIR, type 1: icon
    assert b"\x89PNG" in response.content
    assert "max-age" in response["Cache-Control"]


@pytest.mark.django_db
def test_the_pages_link_an_svg_icon() -> None:
    svg = Client().get("/favicon.svg")
    assert svg.status_code == 200 and svg["Content-Type"] == "image/svg+xml"
    assert svg.content.startswith(b"<svg")
    assert b'rel="icon" href="/favicon.svg"' in Client().get("/").content


@pytest.mark.django_db
def test_healthz_tells_an_anonymous_caller_only_that_it_is_ok() -> None:
    response = Client().get("/healthz")

    assert response.status_code == 200
    assert response.json() == {"status": "ok"}
