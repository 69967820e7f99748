"""What each part of the gateway's hot path costs: the gateway with one part switched off.

    .venv/bin/python bench/ablate.py                     # every variant, GET, 5 s each
    .venv/bin/python bench/ablate.py --variants full nolog all --test post

Each variant is the real ``gateway serve`` (one worker, pinned like run.py's one-worker
layout) started through this file, which first patches one part out of the gateway *in
its own process* (nothing in the repository changes). The bare proxy runs too, as the
floor. For each: requests/s, the CPU the server used and so CPU microseconds per request,
the honest unit on a machine whose load generator shares the CPUs. The difference between
``full`` and a variant is what that part costs per request; the report names the fix.

Variants: ``full`` (nothing off), ``nolog`` (the per-request access log line), ``leanlog``
(not "off" but the proposed fix: the access log formatter scrubs only the fields that can
carry a client's or an upstream's text),
``nometrics`` (Prometheus counters and histograms), ``noclientmw`` (the client middleware on
every upstream request), ``norid`` (``uuid4`` request ids), ``nosignal`` (the
``on_response_prepare`` hooks), ``nomw`` (the ``refuse_connect`` and
``connect_link_middleware`` layers), ``all`` (every one of these at once); and two
garbage-collector variants: ``gcfreeze`` (a possible fix: ``gc.freeze()`` once serving) and
``gcoff`` (the collector disabled: its whole cost, for measurement only); ``fixes`` is
``leanlog`` and ``gcfreeze`` together: the gateway with the proposed changes.

Patched servers are for measurement only: e.g. without the client middleware a refused
WebSocket upgrade would no longer be caught.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import seed, wrk
from bench.harness import (
    PYTHON,
    ROOT,
    BenchError,
    CpuWatch,
    Server,
    cpu_seconds,
    free_port,
    layout,
    origin_conf,
    python_server,
    running,
    start_nginx,
    taskset,
    wait_http,
)

# --------------------------------------------------------------------------- patches


def _nolog() -> None:
    import gateway.serving

    original = gateway.serving.setup_logging

    def setup(*args: Any, **kw: Any) -> None:
        original(*args, **kw)
        logging.getLogger("gateway.access").setLevel(logging.WARNING)

    gateway.serving.setup_logging = setup  # type: ignore[assignment]


# Access-log fields whose values the gateway itself produces (or, for ``msg``, that the
# record factory scrubbed already); everything else may carry client or upstream text.
_OURS = frozenset({"ts", "level", "logger", "pid", "msg", "remote", "status", "provider",
                   "identity", "upstream_status", "duration_ms", "bytes_in", "bytes_out"})


def _leanlog() -> None:
    """The proposed fix: scrub only the fields that can carry someone else's text."""
    import json
    from collections.abc import Mapping
    from datetime import UTC, datetime

    from gateway.accesslog import StructuredFormatter, _logfmt

    def format(self: StructuredFormatter, record: logging.LogRecord) -> str:
        ts = datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds")
        out: dict[str, Any] = {"ts": ts.replace("+00:00", "Z"),
                               "level": record.levelname.lower(), "logger": record.name,
                               "pid": record.process, "msg": record.getMessage()}
        fields = getattr(record, "fields", None)
        if isinstance(fields, Mapping):
            out.update((k, v) for k, v in fields.items() if k not in out)
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            out["exc"] = record.exc_text
        clean = {k: self._redact(v) if isinstance(v, str) and k not in _OURS else v
                 for k, v in out.items()}
        if self.style == "json":
            return json.dumps(clean, ensure_ascii=False, default=str)
        return " ".join(f"{k}={_logfmt(v)}" for k, v in clean.items() if v is not None)

    StructuredFormatter.format = format  # type: ignore[method-assign]


def _nometrics() -> None:
    from gateway.metrics import Metrics

    class _Null:
        def inc(self, *a: Any) -> None: ...
        def dec(self, *a: Any) -> None: ...

    original = Metrics.__init__

    def init(self: Metrics, *args: Any, **kw: Any) -> None:
        original(self, *args, **kw)
        self.in_flight = _Null()  # type: ignore[assignment]

    Metrics.__init__ = init  # type: ignore[method-assign]
    for name in ("request_done", "upstream_answered", "cache_lookup"):
        setattr(Metrics, name, lambda self, *a, **k: None)


def _noclientmw() -> None:
    import gateway.app
    import gateway.proxy.handler

    original = gateway.proxy.handler.make_client_session

    def make(server: Any) -> Any:
        session = original(server)
        session._middlewares = ()
        return session

    gateway.proxy.handler.make_client_session = make
    gateway.app.make_client_session = make


def _norid() -> None:
    import types

    import gateway.accesslog

    fixed = types.SimpleNamespace(hex="0" * 32)
    gateway.accesslog.uuid = types.SimpleNamespace(uuid4=lambda: fixed)  # type: ignore[assignment]


def _wrap_app(change: Callable[[Any], None]) -> None:
    import gateway.app

    original = gateway.app.create_app

    def create(*args: Any, **kw: Any) -> Any:
        app = original(*args, **kw)
        change(app)
        return app

    gateway.app.create_app = create


def _nosignal() -> None:
    _wrap_app(lambda app: app.on_response_prepare.clear())


def _nomw() -> None:
    from aiohttp.web_app import FrozenList

    import gateway.app
    from gateway.proxy.handler import refuse_connect

    drop = (refuse_connect, gateway.app.connect_link_middleware)

    def change(app: Any) -> None:
        app._middlewares = FrozenList([m for m in app._middlewares if m not in drop])

    _wrap_app(change)


def _gcfreeze() -> None:
    """A possible fix: move everything alive once serving (imports, config, templates) out
    of the collector's sight with ``gc.freeze()``, so collections walk only request garbage."""
    import gc

    async def freeze(app: Any) -> None:
        gc.freeze()

    _wrap_app(lambda app: app.on_startup.append(freeze))


def _gcoff() -> None:
    """The collector's whole cost (measurement only: cycles are never freed)."""
    import gc

    gc.disable()
    _wrap_app(lambda app: app.on_startup.append(_disable_gc))


async def _disable_gc(app: Any) -> None:
    import gc

    gc.disable()


PATCHES: dict[str, Callable[[], None]] = {
    "nolog": _nolog, "leanlog": _leanlog, "nometrics": _nometrics, "noclientmw": _noclientmw, "norid": _norid,
    "nosignal": _nosignal, "nomw": _nomw, "gcfreeze": _gcfreeze, "gcoff": _gcoff,
}
FIXES = ("leanlog", "gcfreeze")  # the changes docs/benchmarks.md proposes
VARIANTS = ("full", *PATCHES, "fixes", "all")
# "all" is every part switched off; the fixes (leanlog, gcfreeze) and gcoff stay out of it.
_IN_ALL = [name for name in PATCHES if name not in ("leanlog", "gcfreeze", "gcoff")]


def serve(variant: str, config: str) -> int:
    """The patched ``gateway serve --config CONFIG`` (one worker, in this process)."""
    chosen = {"all": _IN_ALL, "fixes": list(FIXES), "full": []}.get(variant, [variant])
    for name in chosen:
        PATCHES[name]()
    from gateway.cli import main

    return main(["serve", "--config", config])


# --------------------------------------------------------------------------- driver


def measure(server: Server, url: str, script: Path, duration: float, connections: int,
            cpus: tuple[int, ...], others: tuple[Server, ...] = ()) -> dict[str, Any]:
    wrk.run(url, script, duration=2, connections=connections, cpus=cpus)
    cpu0, t0 = cpu_seconds(server.pid), time.monotonic()
    with CpuWatch([server, *others]) as watch:
        r = wrk.run(url, script, duration=duration, connections=connections, cpus=cpus)
    cores = (cpu_seconds(server.pid) - cpu0) / (time.monotonic() - t0)
    server.check()
    return {"rps": r.rps, "p99_ms": r.p99_ms, "errors": r.errors, "cores": round(cores, 2),
            "foreign_cores": round(watch.foreign, 2),
            "cpu_us_per_request": round(cores * 1e6 / r.rps, 1) if r.rps else None}


def _start(variant: str, tmp: Path, config: Path, origin_port: int, port: int,
           cpus: tuple[int, ...]) -> tuple[Server, str, str]:
    """The server for ``variant``: (server, base URL, health path)."""
    if variant == "bare":
        server = python_server("bare", "bare_proxy.py", [
            "--upstream", f"http://127.0.0.1:{origin_port}", "--port", str(port)],
            tmp / "bare.log", cpus)
        return server, f"http://127.0.0.1:{port}/api", "/_bare/healthz"
    server = Server(variant, taskset([PYTHON, str(ROOT / "bench" / "ablate.py"), "--serve",
                                      variant, "--config", str(config)], cpus),
                    tmp / f"{variant}.log")
    return server, f"http://127.0.0.1:{port}/bench", "/_gateway/healthz"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    ap.add_argument("--test", choices=("get", "post"), default="get")
    ap.add_argument("--duration", type=float, default=5.0)
    ap.add_argument("--rounds", type=int, default=1,
                    help="measure every variant this many times, interleaved; report medians")
    ap.add_argument("--connections", type=int, default=64)
    ap.add_argument("--serve", metavar="VARIANT", help=argparse.SUPPRESS)
    ap.add_argument("--config", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.serve:
        return serve(args.serve, args.config)
    lay = layout(1)
    tmp = Path(tempfile.mkdtemp(prefix="gateway-ablate-"))
    post = args.test == "post"
    samples: dict[str, list[dict[str, Any]]] = {}
    try:
        ports = seed.Ports(free_port(), free_port(), free_port())
        origin = start_nginx("origin", tmp / "origin", origin_conf(tmp / "origin", ports.origin),
                             lay.load)
        with running(origin):
            wait_http(origin, ports.origin, "/api/small")
            port = free_port()
            config = seed.write_config(tmp / "gw", port, ports, seed.new_encryption_key(),
                                       tmp / "gw.db")
            key = asyncio.run(seed.seed(config)).key
            for _ in range(args.rounds):
                for variant in ("bare", *args.variants):
                    server, base, health = _start(variant, tmp, config, ports.origin, port,
                                                  lay.server)
                    auth = {} if variant == "bare" else {"Authorization": f"Bearer {key}"}
                    script = tmp / f"{variant}.lua"
                    script.write_text(wrk.lua_script(method="POST" if post else "GET",
                                                     body=b"x" * 4096 if post else b"",
                                                     headers=auth))
                    with running(server):
                        wait_http(server, port, health)
                        row = measure(server, base + ("/echo" if post else "/small"), script,
                                      args.duration, args.connections, lay.load, (origin,))
                    samples.setdefault(variant, []).append(row)
                    print(f"{variant:<11} {row['rps']:>8,.0f} req/s  CPU {row['cores']:.2f}  "
                          f"{row['cpu_us_per_request']:>6} us/request  "
                          f"p99 {row['p99_ms']:.2f} ms  other CPU {row['foreign_cores']:.2f}  "
                          f"errors {row['errors']}", flush=True)
    except BenchError as e:
        print(f"ablation failed: {e}", file=sys.stderr)
        return 1
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    us = {v: statistics.median(r["cpu_us_per_request"] for r in rows)
          for v, rows in samples.items()}
    rps = {v: statistics.median(r["rps"] for r in rows) for v, rows in samples.items()}
    p99 = {v: statistics.median(r["p99_ms"] for r in rows) for v, rows in samples.items()}
    print(f"\nmedians of {args.rounds} round(s), {args.test.upper()}; "
          "CPU per request saved against 'full':")
    for variant, value in us.items():
        saved = f"{us['full'] - value:>7.1f}" if "full" in us else "      -"
        print(f"  {variant:<11} {rps[variant]:>8,.0f} req/s  {value:>6.1f} us/request  "
              f"saves {saved} us  p99 {p99[variant]:6.2f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
