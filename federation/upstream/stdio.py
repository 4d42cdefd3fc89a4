"""Upstream connections to local MCP servers over stdio, as supervised child processes.

One process per peer and worker, started once, kept warm, restarted with backoff when it
dies, and stopped with the gateway (stdin closed, then SIGTERM, then SIGKILL). Messages are
newline-delimited JSON-RPC.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import ctypes
import functools
import json
import logging
import os
import shutil
import signal
import sys
from pathlib import Path
from typing import Any

from federation.upstream.base import (
    JsonDict,
    OnMessage,
    UpstreamProtocolError,
    UpstreamRestartingError,
    UpstreamTimeoutError,
    UpstreamUnavailableError,
    describe_discover,
    modern_meta,
)
from federation.upstream.single_stream import SingleStreamConnection
from federation.upstream.wire import UpstreamMessageError, find_request_id, max_message_bytes

logger = logging.getLogger(__name__)

# Environment passed to children: enough to run, nothing of the gateway's own secrets.
INHERITED_ENV = ("HOME", "LANG", "LC_ALL", "LOGNAME", "PATH", "SHELL", "TERM", "TZ", "USER", "VIRTUAL_ENV")
MAX_BACKOFF = 30.0
_PR_SET_PDEATHSIG = 1
STDERR_TAIL_LINES = 40
"""Lines of a child's stderr kept for `diagnostics()` (the operator's view of why it failed)."""
STDERR_LINE_CHARS = 500
LAUNCHERS = frozenset({"npx", "uvx", "bunx", "pnpx", "pipx"})
"""Programs that fetch the server they run, the first time: that start can take a minute."""
FIRST_START_TIMEOUT = 120.0
"""Connect timeout of the first start of a launcher's server when none was chosen (seconds)."""


def program_dirs() -> list[str]:
    """Where a bare program name is looked for, before PATH: the running interpreter's bin
    folder (the gateway's virtualenv, where `pip install mcp-server-time` puts its script,
    whether or not that folder is on PATH)."""
    return [str(Path(sys.executable).parent)]


def resolve_program(command: str, path: str | None) -> str | None:
    """The file `command` runs: a path as given, else the first match in `program_dirs()`, then
    `path` (the child's PATH). None if there is none."""
    if os.sep in command:
        return command if os.access(command, os.X_OK) and not os.path.isdir(command) else None
    for directory in program_dirs():
        found = shutil.which(command, path=directory)
        if found:
            return found
    return shutil.which(command, path=path or os.defpath)


def fetches_on_first_start(command: str) -> bool:
    """Whether `command` is a launcher (`npx -y pkg`, `uvx pkg`) that may download before serving."""
    return os.path.basename(command) in LAUNCHERS


def _die_with_parent() -> None:
    """In the child: ask Linux for SIGTERM when the gateway process dies, however it dies.

    Children run in their own session (so a Ctrl-C aimed at the gateway does not hit them
    mid-call); this keeps a killed gateway from leaving them behind.
    """
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)


def _signal_group(process: asyncio.subprocess.Process, sig: int) -> None:
    """Send `sig` to the child's process group (its pid: it leads its own session)."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, sig)


class StdioConnection(SingleStreamConnection):
    transport = "stdio"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._process: asyncio.subprocess.Process | None = None
        self._supervisor: asyncio.Task[None] | None = None
        self._ready = asyncio.Event()
        self._write_lock = asyncio.Lock()
        self._stderr_tail: collections.deque[str] = collections.deque(maxlen=STDERR_TAIL_LINES)
        self._stderr_done = asyncio.Event()
        self.restarts = 0

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process else None

    # --- lifecycle -----------------------------------------------------------------------

    async def _open(self) -> None:
        await self._spawn_and_handshake()
        self._supervisor = asyncio.create_task(self._supervise())

    def diagnostics(self) -> str:
        """The last lines the child wrote to stderr (for operators: never sent to hosts)."""
        return "\n".join(self._stderr_tail)

    async def _spawn_and_handshake(self) -> None:
        env = {k: os.environ[k] for k in INHERITED_ENV if k in os.environ}
        env.update(dict(self.peer.env))
        program = resolve_program(self.peer.command, env.get("PATH"))
        if program is None:
            hint = "" if os.sep in self.peer.command else " (install it, or run it with `uvx NAME` / `npx -y PACKAGE`)"
            raise UpstreamUnavailableError(
                f"peer '{self.peer.name}': cannot start {self.peer.command!r}: no such program "
                f"{'file' if os.sep in self.peer.command else 'in the gateway environment or on PATH'}{hint}"
            )
        self._stderr_tail.clear()
        self._stderr_done = asyncio.Event()
        try:
            self._process = await asyncio.create_subprocess_exec(
                program,
                *self.peer.args,
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
                env=env,
                limit=max_message_bytes(),
                start_new_session=True,
                preexec_fn=_die_with_parent,
            )
        except OSError as exc:
            raise UpstreamUnavailableError(f"peer '{self.peer.name}': cannot start {self.peer.command!r}: {exc.strerror}") from exc
        process = self._process
        self._spawn(self._read_stdout(process))
        self._spawn(self._drain_stderr(process, self._stderr_done))
        try:
            async with self._handshaking(functools.partial(self._stop_process, process)):
                await self._handshake_while_running(process)
        except UpstreamTimeoutError as exc:
            if fetches_on_first_start(self.peer.command):
                raise UpstreamTimeoutError(
                    f"{exc} ({os.path.basename(self.peer.command)} downloads the server the first time it runs it; "
                    "give it longer with --connect-timeout)"
                ) from exc
            raise
        self._ready.set()

    async def _handshake_while_running(self, process: asyncio.subprocess.Process) -> None:
        """The handshake, cut short when the child exits (a missing npm package, a crash):
        waiting out the connect timeout would only hide why."""
        handshake = asyncio.ensure_future(self._handshake())
        exited = asyncio.ensure_future(process.wait())
        try:
            await asyncio.wait({handshake, exited}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (handshake, exited):
                if not task.done():
                    task.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await task
        if handshake.done() and not handshake.cancelled():
            error = handshake.exception()
            if error is None:
                return
            if not isinstance(error, UpstreamRestartingError):
                raise error
            # The handshake's write found the child gone: once it is reaped, say why below, as
            # when the exit is noticed first.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(process.wait(), 2.0)
            if process.returncode is None:
                raise error
        # Let the stderr reader take in the child's last words (diagnostics()).
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stderr_done.wait(), 1.0)
        raise UpstreamUnavailableError(
            f"peer '{self.peer.name}': {os.path.basename(self.peer.command)!r} exited with code {process.returncode} before completing the handshake"
        )

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
        await super()._handshake()

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
            if process is not None:
                self._fail_restarting(process, f"peer '{self.peer.name}' process exited (code {process.returncode}); the gateway is restarting it")
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

    def _fail_restarting(self, process: asyncio.subprocess.Process, reason: str) -> None:
        """Fail the calls a dead child was running, all as one incident for the circuit breaker."""
        for future, _ in list(self._pending.values()):
            if not future.done():
                future.set_exception(UpstreamRestartingError(reason, incident=self._incident(process)))

    def _incident(self, process: asyncio.subprocess.Process) -> tuple[int, int]:
        return (id(self), process.pid)

    async def _close(self) -> None:
        if self._supervisor is not None:
            self._supervisor.cancel()
        self._fail_pending(f"connection to peer '{self.peer.name}' closed")
        # Stop the child while its readers still drain its pipes, so a full pipe cannot block its exit.
        if self._process is not None:
            await self._stop_process(self._process)
        await self._cancel_tasks()

    async def _stop_process(self, process: asyncio.subprocess.Process) -> None:
        """Stop the child and whatever it started, and let go of its pipes.

        The child leads a session of its own (`start_new_session`), so its process group is
        everything it started: `npx` runs node, `uvx` runs python, a shell script runs its
        commands. Signals go to the whole group; otherwise a grandchild outlives the gateway's
        interest in it, holding the pipes open (and, in a short-lived `manage.py peer refresh`,
        the pipe transports are then only collected after the event loop is closed: "Event loop
        is closed" tracebacks on every run).
        """
        if process.returncode is None:
            if process.stdin is not None:
                with contextlib.suppress(Exception):
                    process.stdin.close()
            for sig in (None, signal.SIGTERM, signal.SIGKILL):
                if sig is not None:
                    _signal_group(process, sig)
                try:
                    await asyncio.wait_for(process.wait(), 2.0)
                    break
                except TimeoutError:
                    continue
        # The child has exited; anything it left in its group goes too.
        _signal_group(process, signal.SIGKILL)
        # Close the pipes now, on this loop, rather than when the transport is collected.
        transport = getattr(process, "_transport", None)
        if transport is not None:
            transport.close()

    def is_healthy(self) -> bool:
        # A dead child is the supervisor's to restart; the pool keeps this connection meanwhile.
        return not self.closed

    # --- wire ------------------------------------------------------------------------------

    async def _write(self, message: JsonDict) -> None:
        process = self._process
        if process is None or process.stdin is None:
            raise UpstreamUnavailableError(f"peer '{self.peer.name}' process is not running")
        if process.returncode is not None:
            # Died an instant ago; the supervisor is about to restart it.
            raise UpstreamRestartingError(f"peer '{self.peer.name}' process exited; the gateway is restarting it", incident=self._incident(process))
        data = json.dumps(message, separators=(",", ":")).encode() + b"\n"
        async with self._write_lock:
            try:
                process.stdin.write(data)
                await process.stdin.drain()
            except (ConnectionError, RuntimeError) as exc:
                raise UpstreamRestartingError(
                    f"peer '{self.peer.name}' process closed its input; the gateway is restarting it", incident=self._incident(process)
                ) from exc

    async def _read_stdout(self, process: asyncio.subprocess.Process) -> None:
        """Read stdout until the child closes it; whatever the child sends, never stop early.

        A reader that stopped while the child lives on would leave every later call to time
        out, for every user: on any unexpected failure the child is stopped, so the supervisor
        fails what waits and starts a fresh one.
        """
        assert process.stdout is not None
        try:
            await self._read_lines(process.stdout)
        except asyncio.CancelledError:
            raise
        except Exception:
            logger.exception("peer %s: reading stdout failed; restarting the process", self.peer.name)
            await self._stop_process(process)

    async def _read_lines(self, stdout: asyncio.StreamReader) -> None:
        while True:
            try:
                line = await stdout.readuntil(b"\n")
            except asyncio.IncompleteReadError as exc:  # end of output
                if exc.partial.strip():
                    await self._on_frame(exc.partial)
                return
            except asyncio.LimitOverrunError as exc:
                await self._skip_long_line(stdout, exc.consumed)
                continue
            if line.strip():
                await self._on_frame(line)

    async def _skip_long_line(self, stdout: asyncio.StreamReader, consumed: int) -> None:
        """Drop a line past the size bound, failing the call it answers (its id read from its ends)."""
        head = await stdout.readexactly(consumed)
        tail = head[-400:]
        while True:
            try:
                tail = (tail + await stdout.readuntil(b"\n"))[-400:]
                break
            except asyncio.IncompleteReadError as exc:
                tail = (tail + exc.partial)[-400:]
                break
            except asyncio.LimitOverrunError as exc:
                tail = (tail + await stdout.readexactly(exc.consumed))[-400:]
        limit = max_message_bytes()
        self._refuse(UpstreamMessageError(f"peer '{self.peer.name}' sent a message larger than {limit} bytes", find_request_id(head, tail.rstrip())))

    async def _drain_stderr(self, process: asyncio.subprocess.Process, done: asyncio.Event) -> None:
        assert process.stderr is not None
        try:
            while True:
                try:
                    line = await process.stderr.readline()
                except ValueError:  # a line past the limit: dropped (a stopped drainer would block the child)
                    logger.debug("peer %s: dropping an overlong stderr line", self.peer.name)
                    continue
                if not line:
                    return
                text = line.decode(errors="replace").rstrip()
                self._stderr_tail.append(text[:STDERR_LINE_CHARS])
                logger.debug("peer %s stderr: %s", self.peer.name, text)
        finally:
            done.set()

    async def _send_request(
        self, method: str, params: JsonDict | None, on_message: OnMessage | None, timeout: float
    ) -> JsonDict:
        if not self._ready.is_set():
            # The supervisor is restarting the child (usually well under a second): wait for it
            # rather than fail a call the new child can answer.
            try:
                await asyncio.wait_for(self._ready.wait(), min(timeout, self.peer.connect_timeout))
            except TimeoutError:
                raise UpstreamUnavailableError(f"peer '{self.peer.name}' is restarting; try again shortly") from None
        return await super()._send_request(method, params, on_message, timeout)
