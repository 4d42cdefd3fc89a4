"""Upstream connections to local MCP servers over stdio, as supervised child processes.

One process per peer and worker, started once, kept warm, restarted with backoff when it
dies, and stopped with the gateway (stdin closed, then SIGTERM, then SIGKILL). Messages are
newline-delimited JSON-RPC.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
from typing import Any

from federation.upstream.base import (
    JsonDict,
    OnMessage,
    UpstreamConnection,
    UpstreamProtocolError,
    UpstreamTimeoutError,
    UpstreamUnavailableError,
    describe_discover,
    describe_initialize,
    error_reply,
    initialize_params,
    modern_meta,
)

logger = logging.getLogger(__name__)

MAX_LINE_BYTES = 64 * 1024 * 1024
# Environment passed to children: enough to run, nothing of the gateway's own secrets.
INHERITED_ENV = ("HOME", "LANG", "LC_ALL", "LOGNAME", "PATH", "SHELL", "TERM", "TZ", "USER", "VIRTUAL_ENV")
MAX_BACKOFF = 30.0


class StdioConnection(UpstreamConnection):
    transport = "stdio"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._process: asyncio.subprocess.Process | None = None
        self._pending: dict[int, tuple[asyncio.Future[JsonDict], OnMessage | None]] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        self._supervisor: asyncio.Task[None] | None = None
        self._ready = asyncio.Event()
        self._write_lock = asyncio.Lock()
        self.restarts = 0

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process else None

    # --- lifecycle -----------------------------------------------------------------------

    async def _open(self) -> None:
        await self._spawn_and_handshake()
        self._supervisor = asyncio.create_task(self._supervise())

    async def _spawn_and_handshake(self) -> None:
        env = {k: os.environ[k] for k in INHERITED_ENV if k in os.environ}
        env.update(dict(self.peer.env))
        try:
            self._process = await asyncio.create_subprocess_exec(
                self.peer.command,
                *self.peer.args,
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
                env=env,
                limit=MAX_LINE_BYTES,
                start_new_session=True,
            )
        except OSError as exc:
            raise UpstreamUnavailableError(f"peer '{self.peer.name}': cannot start {self.peer.command!r}: {exc.strerror}") from exc
        process = self._process
        self._track(self._read_stdout(process))
        self._track(self._drain_stderr(process))
        try:
            async with asyncio.timeout(self.peer.connect_timeout):
                await self._handshake()
        except TimeoutError as exc:
            await self._stop_process(process)
            raise UpstreamTimeoutError(
                f"peer '{self.peer.name}' did not complete the handshake within {self.peer.connect_timeout:g}s"
            ) from exc
        except BaseException:
            await self._stop_process(process)
            raise
        self._ready.set()

    async def _handshake(self) -> None:
        if self.requested_era in (None, "modern"):
            reply = await self._raw_request("server/discover", {"_meta": modern_meta()}, None)
            result = reply.get("result")
            description = describe_discover(result) if isinstance(result, dict) else None
            if description is not None:
                self.era, self.description = "modern", description
                return
            if self.requested_era == "modern":
                raise UpstreamProtocolError(f"peer '{self.peer.name}' does not speak protocol 2026-07-28")
        self.era = "legacy"
        reply = await self._raw_request("initialize", initialize_params(), None)
        if "error" in reply:
            raise UpstreamProtocolError(f"peer '{self.peer.name}' refused initialize: {reply['error'].get('message')}")
        self.description = describe_initialize(reply.get("result") or {})
        await self._write({"jsonrpc": "2.0", "method": "notifications/initialized"})

    async def _supervise(self) -> None:
        """Restart the child whenever it exits, with exponential backoff."""
        backoff = 0.5
        while not self.closed:
            process = self._process
            if process is not None:
                await process.wait()
            if self.closed:
                return
            self._ready.clear()
            self._fail_pending(f"peer '{self.peer.name}' process exited (code {process.returncode if process else '?'})")
            logger.warning("peer %s: stdio process exited; restarting in %.1fs", self.peer.name, backoff)
            await asyncio.sleep(backoff)
            try:
                await self._spawn_and_handshake()
                self.restarts += 1
                backoff = 0.5
            except Exception as exc:
                logger.warning("peer %s: restart failed: %s", self.peer.name, exc)
                self._process = None
                backoff = min(backoff * 2, MAX_BACKOFF)

    async def _close(self) -> None:
        if self._supervisor is not None:
            self._supervisor.cancel()
        self._fail_pending(f"connection to peer '{self.peer.name}' closed")
        if self._process is not None:
            await self._stop_process(self._process)
        for task in list(self._tasks):
            task.cancel()

    async def _stop_process(self, process: asyncio.subprocess.Process) -> None:
        if process.returncode is not None:
            return
        if process.stdin is not None:
            with contextlib.suppress(Exception):
                process.stdin.close()
        for action in (None, process.terminate, process.kill):
            if action is not None:
                with contextlib.suppress(ProcessLookupError):
                    action()
            try:
                await asyncio.wait_for(process.wait(), 2.0)
                return
            except TimeoutError:
                continue

    def is_healthy(self) -> bool:
        return not self.closed

    # --- wire ------------------------------------------------------------------------------

    def _track(self, coro: Any) -> None:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _write(self, message: JsonDict) -> None:
        process = self._process
        if process is None or process.stdin is None or process.returncode is not None:
            raise UpstreamUnavailableError(f"peer '{self.peer.name}' process is not running")
        data = json.dumps(message, separators=(",", ":")).encode() + b"\n"
        async with self._write_lock:
            try:
                process.stdin.write(data)
                await process.stdin.drain()
            except (ConnectionError, RuntimeError) as exc:
                raise UpstreamUnavailableError(f"peer '{self.peer.name}' process closed its input") from exc

    async def _read_stdout(self, process: asyncio.subprocess.Process) -> None:
        assert process.stdout is not None
        while True:
            try:
                line = await process.stdout.readline()
            except (ValueError, asyncio.LimitOverrunError):
                logger.warning("peer %s: line longer than %d bytes; stopping the process", self.peer.name, MAX_LINE_BYTES)
                await self._stop_process(process)
                return
            if not line:
                return
            try:
                message = json.loads(line)
            except ValueError:
                logger.warning("peer %s: ignoring non-JSON output line", self.peer.name)
                continue
            if isinstance(message, dict):
                await self._on_line(message)

    async def _drain_stderr(self, process: asyncio.subprocess.Process) -> None:
        assert process.stderr is not None
        while line := await process.stderr.readline():
            logger.debug("peer %s stderr: %s", self.peer.name, line.decode(errors="replace").rstrip())

    async def _on_line(self, message: JsonDict) -> None:
        if "method" not in message:
            entry = self._pending.get(message.get("id"))  # type: ignore[arg-type]
            if entry is not None and not entry[0].done():
                entry[0].set_result(message)
            return
        if "id" in message:
            self._track(self._answer(message))
            return
        method = message["method"]
        if method in ("notifications/progress",):
            await self._route_unrelated(message)
        elif method in ("notifications/message", "notifications/cancelled"):
            # stdio has no per-request stream; attribute to the only call in flight, if any.
            handler = self._sole_handler()
            if handler is not None:
                await handler(message)
        else:
            await self._dispatch_event(message)

    def _sole_handler(self) -> OnMessage | None:
        handlers = [h for _, h in self._pending.values() if h is not None]
        return handlers[0] if len(handlers) == 1 else None

    async def _answer(self, request: JsonDict) -> None:
        if request.get("method") == "ping":
            reply: JsonDict | None = {"result": {}}
        else:
            handler = self._sole_handler()
            if handler is None:
                # With several host calls in flight on one process, a server->client request
                # cannot be attributed safely; refusing beats sending it to the wrong user.
                reply = error_reply(-32603, "the gateway cannot tell which host call this request belongs to")
            else:
                try:
                    reply = await handler(request)
                except Exception:
                    logger.exception("peer %s: relaying %s failed", self.peer.name, request.get("method"))
                    reply = error_reply(-32603, "the gateway could not relay this request to the host")
        with contextlib.suppress(UpstreamUnavailableError):
            await self._write({"jsonrpc": "2.0", "id": request["id"], **(reply or error_reply(-32603, "no answer"))})

    async def _raw_request(self, method: str, params: JsonDict | None, on_message: OnMessage | None) -> JsonDict:
        request_id = self.next_id()
        future: asyncio.Future[JsonDict] = asyncio.get_running_loop().create_future()
        self._pending[request_id] = (future, on_message)
        body: JsonDict = {"jsonrpc": "2.0", "id": request_id, "method": method}
        if params is not None:
            body["params"] = params
        try:
            await self._write(body)
            return await future
        except asyncio.CancelledError:
            if method not in ("server/discover", "initialize"):  # the spec forbids cancelling initialize
                with contextlib.suppress(Exception):
                    await self._write(
                        {"jsonrpc": "2.0", "method": "notifications/cancelled", "params": {"requestId": request_id, "reason": "cancelled by host"}}
                    )
            raise
        finally:
            self._pending.pop(request_id, None)

    def _fail_pending(self, reason: str) -> None:
        for future, _ in list(self._pending.values()):
            if not future.done():
                future.set_exception(UpstreamUnavailableError(reason))

    async def _send_request(
        self, method: str, params: JsonDict | None, on_message: OnMessage | None, timeout: float
    ) -> JsonDict:
        if not self._ready.is_set():
            raise UpstreamUnavailableError(f"peer '{self.peer.name}' is restarting; try again shortly")
        try:
            async with asyncio.timeout(timeout):
                return await self._raw_request(method, params, on_message)
        except TimeoutError as exc:
            raise UpstreamTimeoutError(f"peer '{self.peer.name}' did not answer {method} within {timeout:g}s") from exc

    async def _send_notification(self, method: str, params: JsonDict | None) -> None:
        body: JsonDict = {"jsonrpc": "2.0", "method": method}
        if params is not None:
            body["params"] = params
        with contextlib.suppress(UpstreamUnavailableError):
            await self._write(body)
