"""Helpers any app may use; this package imports no app (tests/architecture/test_import_graph.py checks it).

* `caching.py`             per-worker caches that every worker drops together when a domain's generation is bumped;
* `observability.py`       request context on log records, the log formatters;
* `metrics.py`             Prometheus metrics, and the scrape-time ones each app registers in its `ready()`;
* `layers.py`              the in-memory channel layer for a single process;
* `request_connections.py` closes the database connections Django's own views open, when their request ends;
* `security.py`            the edge checks the HTTP transports share: Host (421), Origin (403);
* `json_types.py`          `JsonDict`.
"""
