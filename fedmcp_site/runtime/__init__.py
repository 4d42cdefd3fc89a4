"""What fedmcp changes in the server it runs on (daphne on Twisted, Channels): each module names
the versions it was written against in `TARGETS`, and tests/architecture/test_runtime_patches.py
fails when an installed version differs, so an upgrade re-reads them first.

* access_log.py       daphne's access log, with credentials in query strings redacted
* gc_tuning.py        the worker's garbage collector thresholds
* request_guard.py    deadlines for slow headers and bodies (Twisted's HTTPChannel, daphne's factory)
* websocket_close.py  the application's WebSocket close codes through autobahn's sendClose
* lifecycle.py        readiness and the graceful shutdown of a worker (daphne's server, Twisted's reactor)
"""
