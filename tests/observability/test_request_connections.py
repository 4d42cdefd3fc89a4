"""A Django view's request closes the database connection it opened (fedmcp_lib/request_connections.py).

Under ASGI each Django request runs on a thread of its own that ends with it, so a connection
kept for reuse there would stay open until the garbage collector found it.
"""

from __future__ import annotations

from typing import Any
from unittest import mock

from django.db import connections
from django.db.backends.signals import connection_created

from tests.base import HOST, AsgiTestCase, http


class DjangoRequestConnectionTests(AsgiTestCase):
    async def test_the_connection_a_django_request_opened_is_closed_when_it_ends(self) -> None:
        opened: list[Any] = []
        closed: list[Any] = []
        wrapper_class = type(connections["default"])
        real_close = wrapper_class.close

        def close(wrapper: Any) -> None:
            closed.append(wrapper)
            real_close(wrapper)

        def created(sender: Any, connection: Any, **kwargs: Any) -> None:
            opened.append(connection)

        connection_created.connect(created)
        try:
            with mock.patch.object(wrapper_class, "close", close):
                reply = await http("GET", "/healthz", headers={"host": HOST})
        finally:
            connection_created.disconnect(created)

        assert reply.status == 200, reply.body
        assert opened, "the request's own thread opened no connection"
        assert all(wrapper in closed for wrapper in opened)
