"""Serving: one process, or N worker processes on one port (SO_REUSEPORT) under a parent
that restarts a crashed worker. SIGTERM/SIGINT drain in-flight requests for up to
``server.shutdown_grace`` seconds, then exit 0.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import multiprocessing
import os
import signal
import sys
import time
from multiprocessing.process import BaseProcess

from aiohttp import web

from gateway.config import Config

log = logging.getLogger("gateway")


def setup_logging(level: int = logging.INFO) -> None:
    """Plain structured lines on stderr; the logs never carry secrets (see docs/security)."""
    root = logging.getLogger()
    if not root.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter(
            '{"ts":"%(asctime)s","level":"%(levelname)s","logger":"%(name)s",'
            '"pid":%(process)d,"msg":%(message)r}'))
        root.addHandler(handler)
    root.setLevel(level)


def _use_uvloop() -> None:
    try:
        import uvloop
    except ImportError:
        return
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())


async def serve_async(config: Config, *, reuse_port: bool = False,
                      started: asyncio.Event | None = None) -> None:
    from gateway.app import create_app

    app = create_app(config)
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=config.server.shutdown_grace,
                           handle_signals=False, handler_cancellation=True)
    await runner.setup()
    site = web.TCPSite(runner, config.server.host, config.server.port, reuse_port=reuse_port,
                       backlog=1024)
    await site.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    log.info("serving on http://%s:%s (public URL %s)", config.server.host, config.server.port,
             config.server.public_url)
    if started is not None:
        started.set()
    try:
        await stop.wait()
        log.info("shutting down; draining in-flight requests")
    finally:
        await runner.cleanup()


def _worker(config: Config) -> None:
    setup_logging()
    _use_uvloop()
    asyncio.run(serve_async(config, reuse_port=True))


def run(config: Config, *, workers: int = 1) -> None:
    setup_logging()
    if workers <= 1:
        _use_uvloop()
        asyncio.run(serve_async(config))
        return
    _supervise(config, workers)


def _supervise(config: Config, workers: int) -> None:
    """Start ``workers`` processes and keep them running until SIGTERM/SIGINT."""
    ctx = multiprocessing.get_context("spawn")
    stopping = False

    def stop(signum: int, frame: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    procs: list[BaseProcess] = []
    for _ in range(workers):
        p = ctx.Process(target=_worker, args=(config,), daemon=False)
        p.start()
        procs.append(p)
    log.info("supervising %d workers (pid %d)", workers, os.getpid())
    while not stopping:
        time.sleep(0.2)
        for i, p in enumerate(procs):
            if not p.is_alive() and not stopping:
                log.warning("worker %s exited with %s; restarting", p.pid, p.exitcode)
                q = ctx.Process(target=_worker, args=(config,), daemon=False)
                q.start()
                procs[i] = q
    for p in procs:
        if p.pid is not None and p.is_alive():
            with contextlib.suppress(ProcessLookupError):
                os.kill(p.pid, signal.SIGTERM)
    deadline = time.monotonic() + config.server.shutdown_grace + 5
    for p in procs:
        p.join(max(0.1, deadline - time.monotonic()))
        if p.is_alive():
            p.kill()
