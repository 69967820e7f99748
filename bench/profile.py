"""Profile a proxy's hot path under wrk load with py-spy (a dev tool: ``pip install py-spy``).

    .venv/bin/python bench/profile.py                          # the gateway, 1 worker, GET
    .venv/bin/python bench/profile.py --target bare --test post
    .venv/bin/python bench/profile.py --env GATEWAY_LOG_LEVEL=WARNING

Starts the nginx origin and the server under test (pinned like run.py's one-worker layout),
warms it, then samples it with ``py-spy record --nonblocking`` while wrk loads it. Prints the
share of busy samples per package (own time), the functions with the most own time and the
functions on the most stacks (inclusive), and keeps the collapsed stacks
(``bench/results/profile-<target>-<test>.collapsed``; open them in speedscope.app or feed
them to flamegraph.pl) next to the printed summary (``.txt``).
"""

from __future__ import annotations

import argparse
import asyncio
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import seed, wrk
from bench.harness import (
    PYTHON,
    ROOT,
    BenchError,
    Server,
    cpu_seconds,
    descendants,
    free_port,
    layout,
    origin_conf,
    python_server,
    running,
    start_nginx,
    taskset,
    wait_http,
    wait_workers,
)

_FRAME = re.compile(r"^(?P<func>.*) \((?P<file>[^()]*)\)$")


def frames(stack: str) -> list[tuple[str, str]]:
    """``(function, file)`` for each frame of a collapsed py-spy stack, outermost first."""
    out = []
    for frame in stack.split(";"):
        m = _FRAME.match(frame.strip())
        out.append((m["func"], m["file"]) if m else (frame.strip(), ""))
    return out


def package(file: str) -> str:
    """The top-level package of a file as py-spy shortens it (``aiohttp/client.py``)."""
    if not file or file.startswith("<"):
        return file or "other"
    return file.replace("\\", "/").lstrip("/").split("/", 1)[0].removesuffix(".py")


def aggregate(lines: Iterable[str]) -> tuple[int, Counter[str], Counter[str], Counter[str]]:
    """(samples, own time per package, own time per function, stacks per function)."""
    total = 0
    by_package: Counter[str] = Counter()
    own: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    for line in lines:
        stack, _, count_s = line.rstrip().rpartition(" ")
        if not stack or not count_s.isdigit():
            continue
        count = int(count_s)
        total += count
        fs = frames(stack)
        func, file = fs[-1]
        by_package[package(file)] += count
        own[f"{func} ({file})"] += count
        for name in {f"{f} ({p})" for f, p in fs}:
            inclusive[name] += count
    return total, by_package, own, inclusive


def _table(title: str, counts: Counter[str], total: int, n: int) -> str:
    rows = [f"{title}"]
    for name, count in counts.most_common(n):
        rows.append(f"  {100 * count / total:5.1f}%  {name}")
    return "\n".join(rows)


def summarize(path: Path, top: int = 25) -> str:
    total, by_package, own, inclusive = aggregate(path.read_text().splitlines())
    if not total:
        return "no samples"
    return "\n\n".join([
        f"{total} busy samples",
        _table("own time by package:", by_package, total, 15),
        _table("own time by function:", own, total, top),
        _table("inclusive (on the stack) by function:", inclusive, total, top),
    ])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--target", choices=("gateway", "bare"), default="gateway")
    ap.add_argument("--test", choices=("get", "post"), default="get")
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--variant", default="full",
                    help="a bench/ablate.py variant of the gateway (one worker), e.g. all")
    ap.add_argument("--duration", type=float, default=10.0)
    ap.add_argument("--connections", type=int, default=64)
    ap.add_argument("--rate", type=int, default=250, help="py-spy samples per second")
    ap.add_argument("--env", action="append", default=[], metavar="NAME=VALUE",
                    help="environment for the server (e.g. GATEWAY_LOG_LEVEL=WARNING)")
    ap.add_argument("--out", type=Path, help="collapsed stacks (default bench/results/...)")
    args = ap.parse_args()
    spy = shutil.which("py-spy") or str(Path(PYTHON).parent / "py-spy")
    if not Path(spy).exists():
        print("py-spy not found: .venv/bin/pip install py-spy", file=sys.stderr)
        return 2
    suffix = "" if args.variant == "full" else f"-{args.variant}"
    out = args.out or (ROOT / "bench" / "results" /
                       f"profile-{args.target}{suffix}-{args.test}.collapsed")
    env = dict(e.split("=", 1) for e in args.env)
    tmp = Path(tempfile.mkdtemp(prefix="gateway-profile-"))
    lay = layout(args.workers)
    try:
        ports = seed.Ports(free_port(), free_port(), free_port())
        origin = start_nginx("origin", tmp / "origin", origin_conf(tmp / "origin", ports.origin),
                             lay.load)
        with running(origin):
            wait_http(origin, ports.origin, "/api/small")
            port = free_port()
            if args.target == "gateway":
                config = seed.write_config(tmp / "gw", port, ports, seed.new_encryption_key(),
                                           tmp / "gw.db")
                key = asyncio.run(seed.seed(config)).key
                cmd = [PYTHON, "-m", "gateway", "serve", "--config", str(config), "--workers",
                       str(args.workers)]
                if args.variant != "full":
                    cmd = [PYTHON, str(ROOT / "bench" / "ablate.py"), "--serve", args.variant,
                           "--config", str(config)]
                server = Server("gateway", taskset(cmd, lay.server), tmp / "server.log", env=env)
                health, base, auth = "/_gateway/healthz", f"http://127.0.0.1:{port}/bench", key
            else:
                server = python_server("bare", "bare_proxy.py", [
                    "--upstream", f"http://127.0.0.1:{ports.origin}", "--port", str(port),
                    "--workers", str(args.workers)], tmp / "server.log", lay.server, env=env)
                health, base, auth = "/_bare/healthz", f"http://127.0.0.1:{port}/api", None
            with running(server):
                wait_http(server, port, health)
                wait_workers(server, port, health, args.workers)
                script = tmp / "load.lua"
                script.write_text(wrk.lua_script(
                    method="POST" if args.test == "post" else "GET",
                    body=b"x" * 4096 if args.test == "post" else b"",
                    headers={"Authorization": f"Bearer {auth}"} if auth else {}))
                url = f"{base}/small" if args.test == "get" else f"{base}/echo"
                wrk.run(url, script, duration=2, connections=args.connections, cpus=lay.load)
                pids = [p for p in descendants(server.pid)
                        if args.workers == 1 or p != server.pid]
                load = subprocess.Popen(taskset(
                    [wrk.wrk_binary(), "-t1", "-c", str(args.connections), "-d",
                     f"{round(args.duration) + 2}s", "--latency", "-s", str(script), url],
                    lay.load), stdout=subprocess.PIPE, text=True)
                time.sleep(1)
                cpu0, t0 = cpu_seconds(server.pid), time.monotonic()
                out.parent.mkdir(parents=True, exist_ok=True)
                spies = [subprocess.Popen(taskset(
                    [spy, "record", "--nonblocking", "--nolineno", "-r", str(args.rate),
                     "-d", str(round(args.duration)), "-f", "raw", "-o", f"{out}.{pid}",
                     "-p", str(pid)], lay.load), stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL) for pid in pids]
                for s in spies:
                    s.wait()
                cores = (cpu_seconds(server.pid) - cpu0) / (time.monotonic() - t0)
                stdout, _ = load.communicate()
                server.check()
        result = wrk.parse(stdout)
    except BenchError as e:
        print(f"profile failed: {e}", file=sys.stderr)
        return 1
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    parts = [Path(f"{out}.{pid}") for pid in pids]
    out.write_text("".join(p.read_text() for p in parts if p.exists()))
    for p in parts:
        p.unlink(missing_ok=True)
    us = cores * 1e6 / result.rps if result.rps else 0.0
    text = (f"{args.target} ({args.variant}), {args.workers} worker(s), {args.test.upper()}, "
            f"under py-spy: {result.rps:,.0f} req/s, p99 {result.p99_ms:.2f} ms, errors "
            f"{result.errors}; server CPU {cores:.2f} cores = {us:.0f} us per request "
            f"(percentages below are of that)\n\n{summarize(out)}\n")
    out.with_suffix(".txt").write_text(text)
    print(text)
    print(f"summary: {out.with_suffix('.txt')}\ncollapsed stacks: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
