"""Serving: one process, or N worker processes on one port under a supervising parent.

Theory of operation
-------------------
* ``--workers 1`` serves in this process. ``--workers N`` starts N *spawned* worker
  processes, each binding the port with ``SO_REUSEPORT`` (the kernel spreads connections),
  and the parent supervises them: a worker that dies is logged and replaced (quickly
  deaths before serving back off up to 30 s), and the parent points ``PROMETHEUS_MULTIPROC_DIR``
  at a fresh directory so any worker can answer a scrape for all of them.
* SIGTERM / SIGINT: each worker closes its listening socket (new connections go to the
  others, or are refused), lets requests in flight finish for up to
  ``server.shutdown_grace`` seconds, cancels what is left, closes the store and exits 0;
  the parent forwards the signal, waits for its workers and exits 0.
* SIGHUP (``gateway reload``): the provider configuration is re-read from the config file
  and swapped in without closing a connection (see :func:`gateway.app.reload_config`). An
  invalid file is refused with one log line naming the key at fault; the running
  configuration stays. The parent validates first, then forwards SIGHUP to the workers
  that are up; a worker still starting is told once it is ready, and a replacement worker
  starts with the newest configuration.
* The parent (or the single process, once serving) writes its pid to the pidfile
  (``--pidfile``, default ``gateway.pid`` next to the config file) for ``gateway reload``.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import multiprocessing
import os
import shutil
import signal
import socket
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from multiprocessing.connection import Connection, wait
from multiprocessing.process import BaseProcess
from pathlib import Path

from aiohttp import web

from gateway.accesslog import setup_logging as _setup_logging
from gateway.config import Config, load_config
from gateway.errors import ConfigError, GatewayError
from gateway.limits import parser_limits
from gateway.metrics import MULTIPROC_ENV, mark_worker_dead

log = logging.getLogger("gateway.serving")

PIDFILE_NAME = "gateway.pid"
MAX_BACKOFF = 30.0
EXTRA_STOP_WAIT = 5.0  # on top of the grace, before the parent kills a worker


def setup_logging(style: str = "json", level: int | str | None = None) -> None:
    """Structured, redacted lines on stderr (``$GATEWAY_LOG_LEVEL`` overrides INFO)."""
    _setup_logging(style, level or os.environ.get("GATEWAY_LOG_LEVEL", "INFO").upper())


def _use_uvloop() -> None:
    try:
        import uvloop
    except ImportError:
        return
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())


# --------------------------------------------------------------------------- pidfile


def default_pidfile(config: Config) -> Path:
    return config.source.parent / PIDFILE_NAME


@contextlib.contextmanager
def written_pidfile(path: Path) -> Iterator[None]:
    """Write our pid (atomically) while serving; remove it after, if it is still ours."""
    pid = str(os.getpid())
    tmp = path.with_name(f".{path.name}.{pid}")
    tmp.write_text(pid + "\n", encoding="ascii")
    tmp.replace(path)
    try:
        yield
    finally:
        with contextlib.suppress(OSError):
            if path.read_text(encoding="ascii").strip() == pid:
                path.unlink()


def request_reload(path: Path) -> int:
    """Send SIGHUP to the gateway whose pid ``path`` holds; returns the pid."""
    try:
        pid = int(path.read_text(encoding="ascii").strip())
    except FileNotFoundError:
        raise GatewayError(f"no pidfile at {path}: is the gateway running (it writes one "
                           "when serving; see `gateway serve --pidfile`)?") from None
    except (OSError, ValueError):
        raise GatewayError(f"pidfile {path} does not hold a process id") from None
    try:
        os.kill(pid, signal.SIGHUP)
    except ProcessLookupError:
        raise GatewayError(f"pidfile {path} names process {pid}, which is not running "
                           "(a stale pidfile)") from None
    except PermissionError:
        raise GatewayError(f"not allowed to signal process {pid} (from {path})") from None
    return pid


# --------------------------------------------------------------------------- one server


async def serve_async(config: Config, *, reuse_port: bool = False,
                      started: asyncio.Event | None = None,
                      on_ready: Callable[[], None] | None = None) -> None:
    """Serve until SIGTERM/SIGINT, then drain; SIGHUP reloads the providers."""
    from gateway.app import SERVICES, create_app, reload_config

    app = create_app(config)
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=config.server.shutdown_grace,
                           handle_signals=False, handler_cancellation=True,
                           **parser_limits(config.server))
    await runner.setup()
    site = web.TCPSite(runner, config.server.host, config.server.port, reuse_port=reuse_port,
                       backlog=1024)
    await site.start()
    # Everything built so far lives for the whole process: keep it out of the collector's
    # generations (bench/ablate.py: ~8 us less CPU per request, p99 44 -> 28 ms).
    gc.freeze()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    reloads: set[asyncio.Task[bool]] = set()

    def reload() -> None:
        task = loop.create_task(reload_config(app))
        reloads.add(task)
        task.add_done_callback(reloads.discard)

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    loop.add_signal_handler(signal.SIGHUP, reload)
    log.info("serving on http://%s:%s (public URL %s)", config.server.host, config.server.port,
             config.server.public_url)
    if started is not None:
        started.set()
    if on_ready is not None:
        on_ready()
    try:
        await stop.wait()
        app[SERVICES].draining = True
        log.info("shutting down: draining in-flight requests for up to %gs",
                 config.server.shutdown_grace)
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            loop.remove_signal_handler(sig)
        signal.signal(signal.SIGHUP, signal.SIG_IGN)  # too late to reload; never die of it
        await runner.cleanup()
        log.info("stopped")


async def _orphan_watch(parent: int, stop: Callable[[], None]) -> None:
    """A worker whose supervisor died (SIGKILL) drains and exits instead of lingering."""
    while True:
        await asyncio.sleep(1.0)
        if os.getppid() != parent:
            break
    log.warning("supervisor %d is gone; stopping", parent)
    stop()


def _worker(config: Config, conn: Connection, parent: int) -> None:
    """A worker process's entry point (spawned: a fresh interpreter)."""
    signal.signal(signal.SIGHUP, signal.SIG_IGN)  # until serve_async handles it
    setup_logging(config.log_format)
    _use_uvloop()

    async def main() -> None:
        watch = asyncio.create_task(
            _orphan_watch(parent, lambda: os.kill(os.getpid(), signal.SIGTERM)))
        try:
            await serve_async(config, reuse_port=True, on_ready=lambda: conn.send("ready"))
        finally:
            watch.cancel()

    try:
        asyncio.run(main())
    except (OSError, GatewayError) as e:  # e.g. the port is taken, the store is down
        log.error("worker cannot serve: %s", e.message if isinstance(e, GatewayError) else e)
        raise SystemExit(1) from None


def run(config: Config, *, workers: int = 1, pidfile: str | os.PathLike[str] | None = None
        ) -> None:
    """Serve ``config`` with ``workers`` processes until SIGTERM/SIGINT; returns after a
    clean drain (the CLI then exits 0)."""
    from gateway.app import ops_settings

    signal.signal(signal.SIGHUP, signal.SIG_IGN)  # a reload before we can do it is dropped
    setup_logging(config.log_format)
    ops_settings(config)  # a bad admin key is a config error (exit 2) before any worker starts
    path = Path(pidfile) if pidfile is not None else default_pidfile(config)
    if workers > 1 and config.server.port == 0:
        raise ConfigError("server.port", "0 (any free port) cannot be shared by several "
                          "workers; choose a port")
    if workers <= 1:
        _use_uvloop()

        async def single() -> None:
            stack = contextlib.ExitStack()
            try:
                await serve_async(config,
                                  on_ready=lambda: stack.enter_context(written_pidfile(path)))
            finally:
                stack.close()

        asyncio.run(single())
        return
    with written_pidfile(path):
        Supervisor(config, workers).run()


# --------------------------------------------------------------------------- supervisor


@dataclass(slots=True)
class _Slot:
    process: BaseProcess | None = None
    conn: Connection | None = None
    generation: int = 0
    ready: bool = False
    failures: int = 0  # consecutive fast exits
    restart_at: float | None = None


class Supervisor:
    """Keeps ``workers`` processes serving; see the module docstring."""

    def __init__(self, config: Config, workers: int) -> None:
        self.config = config
        self.generation = 0
        self._ctx = multiprocessing.get_context("spawn")
        self._slots = [_Slot() for _ in range(workers)]
        self._stopping = False
        self._reload = False
        self._metrics_dir: str | None = None

    def run(self) -> None:
        owned = MULTIPROC_ENV not in os.environ
        if owned:
            self._metrics_dir = tempfile.mkdtemp(prefix="gateway-metrics-")
            os.environ[MULTIPROC_ENV] = self._metrics_dir
        else:
            self._metrics_dir = os.environ[MULTIPROC_ENV]
        wake_r, wake_w = socket.socketpair()
        wake_r.setblocking(False)
        wake_w.setblocking(False)
        old_wakeup = signal.set_wakeup_fd(wake_w.fileno())
        handlers = {sig: signal.signal(sig, self._on_signal)
                    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)}
        try:
            for slot in self._slots:
                self._start(slot)
            log.info("supervising %d workers on port %s (pid %d)", len(self._slots),
                     self.config.server.port, os.getpid())
            while not self._stopping:
                self._step(wake_r)
            self._shutdown()
        finally:
            for sig, handler in handlers.items():
                signal.signal(sig, handler)
            signal.set_wakeup_fd(old_wakeup)
            wake_r.close()
            wake_w.close()
            if owned and self._metrics_dir:
                shutil.rmtree(self._metrics_dir, ignore_errors=True)
                os.environ.pop(MULTIPROC_ENV, None)
        log.info("all workers stopped")

    def _on_signal(self, signum: int, frame: object) -> None:
        if signum == signal.SIGHUP:
            self._reload = True
        else:
            self._stopping = True

    def _step(self, wake: socket.socket) -> None:
        now = time.monotonic()
        due = [s.restart_at for s in self._slots if s.restart_at is not None]
        timeout = max(0.0, min(due) - now) if due else None
        waitables: list[object] = [wake]
        for s in self._slots:
            if s.process is not None:
                waitables.append(s.process.sentinel)
            if s.conn is not None and not s.ready:
                waitables.append(s.conn)
        wait(waitables, timeout)  # type: ignore[arg-type]
        with contextlib.suppress(BlockingIOError):
            while wake.recv(512):
                pass
        if self._stopping:
            return
        if self._reload:
            self._reload = False
            self._reload_config()
        for slot in self._slots:
            self._check(slot)

    def _check(self, slot: _Slot) -> None:
        p, now = slot.process, time.monotonic()
        if p is not None and slot.conn is not None and not slot.ready and slot.conn.poll():
            with contextlib.suppress(EOFError, OSError):
                slot.conn.recv()
                slot.ready, slot.failures = True, 0
                log.info("worker %s is serving", p.pid)
                if slot.generation < self.generation:
                    self._signal(slot, signal.SIGHUP)  # a reload came while it started
                    slot.generation = self.generation
        if p is not None and not p.is_alive():
            p.join()
            # Dying before serving is a crash loop in the making (a port taken, the store
            # down): back off. A worker that served and then died is replaced at once.
            slot.failures = 0 if slot.ready else slot.failures + 1
            delay = 0.0 if not slot.failures else min(MAX_BACKOFF, 0.5 * 2 ** slot.failures)
            log.warning("worker %s exited with code %s; starting a replacement%s", p.pid,
                        p.exitcode, f" in {delay:g}s" if delay else "")
            if self._metrics_dir and p.pid is not None:
                with contextlib.suppress(OSError):
                    mark_worker_dead(p.pid, self._metrics_dir)
            self._close(slot)
            slot.restart_at = now + delay
        if slot.process is None and slot.restart_at is not None and slot.restart_at <= now:
            self._start(slot)

    def _start(self, slot: _Slot) -> None:
        ours, theirs = self._ctx.Pipe(duplex=False)
        p = self._ctx.Process(target=_worker, args=(self.config, theirs, os.getpid()),
                              daemon=False, name="gateway-worker")
        p.start()
        theirs.close()
        slot.process, slot.conn, slot.ready = p, ours, False
        slot.generation, slot.restart_at = self.generation, None
        log.info("started worker %s", p.pid)

    def _close(self, slot: _Slot) -> None:
        if slot.conn is not None:
            slot.conn.close()
        slot.process, slot.conn, slot.ready = None, None, False

    def _signal(self, slot: _Slot, sig: int) -> None:
        if slot.process is not None and slot.process.pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(slot.process.pid, sig)

    def _reload_config(self) -> None:
        """Validate in the parent, so a broken file is refused once and workers started
        later get the newest good providers; then tell the running workers."""
        try:
            new = load_config(self.config.source)
        except (ConfigError, OSError) as e:
            text = e.message if isinstance(e, ConfigError) else str(e)
            log.error("config reload refused: %s: %s; keeping the running configuration",
                      self.config.source, text)
            return
        self.config = replace(self.config, providers=new.providers)
        self.generation += 1
        told = 0
        for slot in self._slots:
            if slot.ready:
                self._signal(slot, signal.SIGHUP)
                slot.generation = self.generation
                told += 1
        log.info("config reload: %s is valid; told %d workers", self.config.source, told)

    def _shutdown(self) -> None:
        log.info("stopping %d workers", sum(s.process is not None for s in self._slots))
        for slot in self._slots:
            self._signal(slot, signal.SIGTERM)
        deadline = time.monotonic() + self.config.server.shutdown_grace + EXTRA_STOP_WAIT
        for slot in self._slots:
            p = slot.process
            if p is None:
                continue
            p.join(max(0.1, deadline - time.monotonic()))
            if p.is_alive():
                log.warning("worker %s did not stop in time; killing it", p.pid)
                p.kill()
                p.join()
            self._close(slot)
