"""A loopback reverse proxy that adds a bearer token to every request.

The official conformance suite has no option to send an `Authorization` header, while every
fedmcp transport requires one. Tests put this proxy in front of a gateway: the suite talks to
the proxy, the gateway sees the token. Everything else (method, path, Host, Origin, body) passes
through unchanged, and responses stream back as they arrive, so SSE works.

Run: python -m tests.e2e.auth_proxy --upstream http://127.0.0.1:PORT --token-file FILE --port N
"""

from __future__ import annotations

import argparse
import contextlib
import shutil
import subprocess
import tempfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import StreamingResponse
from starlette.routing import Route

HOP_BY_HOP = {b"connection", b"transfer-encoding", b"content-length", b"keep-alive", b"authorization"}


def build_app(upstream: str, token: str) -> Starlette:
    client = httpx.AsyncClient(base_url=upstream, timeout=httpx.Timeout(30, read=None))

    async def proxy(request: Request) -> StreamingResponse:
        headers = [(k, v) for k, v in request.headers.raw if k.lower() not in HOP_BY_HOP]
        headers.append((b"authorization", f"Bearer {token}".encode()))
        target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
        upstream_request = client.build_request(request.method, target, headers=headers, content=await request.body())
        response = await client.send(upstream_request, stream=True)

        async def body() -> AsyncIterator[bytes]:
            try:
                async for chunk in response.aiter_raw():
                    yield chunk
            finally:
                await response.aclose()

        passed = {k: v for k, v in response.headers.items() if k.lower().encode() not in HOP_BY_HOP}
        return StreamingResponse(body(), status_code=response.status_code, headers=passed)

    methods = ["GET", "POST", "DELETE", "PUT", "PATCH", "OPTIONS"]
    return Starlette(routes=[Route("/{path:path}", proxy, methods=methods)])


@contextlib.contextmanager
def auth_proxy(upstream: str, token: str, port: int) -> Iterator[str]:
    """Run the proxy on 127.0.0.1:`port` in a subprocess; yields its base URL."""
    from tests.e2e.harness import PY, ROOT, stop, wait_http

    token_file = Path(tempfile.mkdtemp(prefix="fedmcp-proxy-")) / "token"
    token_file.write_text(token)
    process = subprocess.Popen(
        [PY, "-m", "tests.e2e.auth_proxy", "--upstream", upstream, "--token-file", str(token_file), "--port", str(port)],
        cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )
    try:
        base = f"http://127.0.0.1:{port}"
        wait_http(f"{base}/healthz", process=process)
        yield base
    finally:
        stop(process)
        shutil.rmtree(token_file.parent, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--upstream", required=True)
    parser.add_argument("--token-file", required=True)
    parser.add_argument("--port", type=int, required=True)
    options = parser.parse_args()
    app = build_app(options.upstream, Path(options.token_file).read_text().strip())
    uvicorn.run(app, host="127.0.0.1", port=options.port, log_level="warning")


if __name__ == "__main__":
    main()
