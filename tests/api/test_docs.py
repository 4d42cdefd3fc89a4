"""The API docs pages load everything from the gateway itself: no CDN, nothing from the internet."""

from __future__ import annotations

import re

from tests.api.common import ApiTestCase, api_client
from tests.base import persona


class ApiDocsTest(ApiTestCase):
    def staff(self):  # type: ignore[no-untyped-def]
        client = api_client()
        client.force_login(persona("root"))
        return client

    def test_swagger_ui_references_only_local_assets(self) -> None:
        # (No Redoc page: drf-spectacular's Redoc template loads Google Fonts.)
        client = self.staff()
        for path in ("/api/docs/",):
            page = client.get(path)
            assert page.status_code == 200
            text = page.content.decode()
            sources = re.findall(r'(?:src|href)="([^"]+)"', text)
            assert sources, path
            assert not [s for s in sources if s.startswith(("http:", "https:", "//"))], (path, sources)
            assert "/static/drf_spectacular_sidecar/" in text

    def test_the_docs_need_a_staff_session(self) -> None:
        assert api_client().get("/api/docs/").status_code in (401, 403)
