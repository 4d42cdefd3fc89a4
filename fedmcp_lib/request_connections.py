"""Database connections opened by Django's own views are closed when their request ends.

Under ASGI, Django runs a request's synchronous code (middleware, the admin, the REST API, the
OAuth endpoints, /healthz) on a thread made for that request alone (asgiref's
`ThreadSensitiveContext`), and the thread ends with the request. A connection kept for reuse
(`CONN_MAX_AGE`, settings `FEDMCP_DB_CONN_MAX_AGE`) can never be reused there: it stays open, its
thread gone, until the garbage collector finds it. Measured on one daphne worker with
PostgreSQL: 40 requests to /healthz left 31 connections open.

The MCP transports are Channels consumers, not Django views: their database work runs on one
long-lived thread per worker, which sends no request signals, so its connection is kept.
"""

from __future__ import annotations

from typing import Any

from django.db import connections


def close_request_connections(**kwargs: Any) -> None:
    """Close this thread's database connections at the end of a Django request.

    A connection inside a transaction is left alone: closing it would break the transaction
    (a `TestCase` runs its test client's requests inside the test's own).
    """
    for connection in connections.all(initialized_only=True):
        if not connection.in_atomic_block:
            connection.close()
