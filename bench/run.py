"""The benchmark suite, in one run, on loopback (see docs/benchmarks.md).

    .venv/bin/python bench/run.py --quick          # about two minutes
    .venv/bin/python bench/run.py                  # the full run reported in the docs

Side by side, for a small GET and a 4 KiB POST, with wrk: the origin directly (nginx
answering a small JSON body), nginx as a reverse proxy injecting a static Authorization
header, a bare aiohttp pass-through proxy (bench/bare_proxy.py) and the gateway, each with
one worker and with two. Then, through the gateway: 1 GiB streamed each way (throughput, peak
RSS of the serving process), a refresh storm (1,000 concurrent requests on an expired
token: token endpoint calls, tail latency), store scale (100,000 identities with keys and
connections) and start-up time. Prints the table, ratios and targets; writes JSON to
bench/results/latest.json (``--out`` to change).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import report, scenarios, seed, wrk
from bench.harness import (
    PYTHON,
    ROOT,
    BenchError,
    CpuWatch,
    Layout,
    Server,
    available_cpus,
    cpu_seconds,
    free_port,
    layout,
    nginx_binary,
    origin_conf,
    pin,
    proxy_conf,
    python_server,
    raise_fd_limit,
    running,
    start_nginx,
    taskset,
    wait_http,
    wait_workers,
)

POST_BODY = b"x" * 4096


@dataclass(frozen=True, slots=True)
class Settings:
    quick: bool
    duration: float
    warmup: float
    connections: int
    stream_bytes: int
    storm_requests: int
    token_delay_ms: float
    scale_identities: int
    startup_reps: int
    workers: tuple[int, ...]
    phases: frozenset[str]
    retries: int
    max_foreign: float


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


# --------------------------------------------------------------------------- machine load


def loadavg() -> tuple[float, float, float]:
    one, five, fifteen = Path("/proc/loadavg").read_text().split()[:3]
    return float(one), float(five), float(fifteen)


def wait_until_idle(max_load: float, max_wait: float) -> dict[str, Any]:
    """Poll the 1-minute load average every 30 s until it is below ``max_load``."""
    waited = 0.0
    while loadavg()[0] > max_load and waited < max_wait:
        log(f"load average {loadavg()[0]:.2f} > {max_load}: waiting 30 s "
            f"({waited:.0f}/{max_wait:.0f} s)")
        time.sleep(30)
        waited += 30
    return {"loadavg_at_start": loadavg(), "waited_s": waited, "max_load": max_load}


def machine() -> dict[str, Any]:
    model = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import aiohttp

    try:
        import uvloop

        loop = f"uvloop {uvloop.__version__}"
    except ImportError:
        loop = "asyncio"
    return {"nproc": os.cpu_count(), "cpus_usable": list(available_cpus()), "cpu_model": model,
            "kernel": platform.release(), "python": platform.python_version(),
            "aiohttp": aiohttp.__version__, "event_loop": loop,
            "nginx": _version([nginx_binary(), "-v"]), "wrk": _version([wrk.wrk_binary(), "-v"])}


def _version(cmd: list[str]) -> str:
    import subprocess

    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    text = (done.stdout + done.stderr).strip().splitlines()
    return text[0] if text else "unknown"


def wait_for_quiet(max_foreign: float, max_wait: float) -> float:
    """Sample 5 s windows until other processes use at most ``max_foreign`` cores (or
    ``max_wait`` seconds passed); the last window's figure."""
    deadline = time.monotonic() + max_wait
    while True:
        with CpuWatch([]) as watch:
            time.sleep(5)
        if watch.foreign <= max_foreign or time.monotonic() > deadline:
            return watch.foreign


@contextmanager
def client_on(cpus: tuple[int, ...]) -> Iterator[None]:
    """Run this process (the load side of the Python-driven scenarios) on ``cpus``."""
    before = os.sched_getaffinity(0)
    os.sched_setaffinity(0, set(cpus))
    try:
        yield
    finally:
        os.sched_setaffinity(0, before)


# --------------------------------------------------------------------------- the suite


class Suite:
    """Owns the temp dir, the always-on servers (origin, stream upstream, token server) and
    the results."""

    def __init__(self, settings: Settings, tmp: Path) -> None:
        self.s = settings
        self.tmp = tmp
        self.ports = seed.Ports(free_port(), free_port(), free_port())
        self.enc_key = seed.new_encryption_key()
        self.rows: list[dict[str, Any]] = []
        self.results: dict[str, Any] = {"storm": [], "startup": []}
        self.support: list[Server] = []
        self._scripts: dict[tuple[str, str, str], Path] = {}

    # ---------------------------------------------------------------- servers

    def start_support(self) -> None:
        lay = layout(1)
        origin = start_nginx("origin nginx", self.tmp / "origin",
                             origin_conf(self.tmp / "origin", self.ports.origin), lay.load)
        self.support.append(origin)
        stream = python_server("stream upstream", "servers.py",
                               ["stream", "--port", str(self.ports.stream)],
                               self.tmp / "stream.log", lay.load)
        self.support.append(stream)
        token = python_server("token server", "servers.py",
                              ["token", "--port", str(self.ports.token), "--token-delay-ms",
                               str(self.s.token_delay_ms)], self.tmp / "token.log", lay.load)
        self.support.append(token)
        wait_http(origin, self.ports.origin, "/api/small")
        wait_http(stream, self.ports.stream, "/api/small")
        wait_http(token, self.ports.token, "/bench/hits")

    def place_support(self, lay: Layout) -> None:
        for server in self.support:
            pin(server.pid, lay.load)

    def gateway(self, config: Path, workers: int, lay: Layout, port: int, name: str,
                env: dict[str, str] | None = None) -> Server:
        cmd = [PYTHON, "-m", "gateway", "serve", "--config", str(config), "--workers",
               str(workers)]
        server = Server(name, taskset(cmd, lay.server), self.tmp / f"{name}.log", env=env)
        try:
            wait_http(server, port, "/_gateway/healthz")
            wait_workers(server, port, "/_gateway/healthz", workers)
        except BaseException:
            server.stop()
            raise
        return server

    def config(self, name: str, store: str) -> tuple[Path, int]:
        port = free_port()
        folder = self.tmp / name
        return seed.write_config(folder, port, self.ports, self.enc_key,
                                 self.tmp / store), port

    # ---------------------------------------------------------------- wrk

    def script(self, test: str, auth: str | None, keys_file: Path | None = None) -> Path:
        key = (test, auth or "", str(keys_file or ""))
        if key not in self._scripts:
            headers = {"Authorization": f"Bearer {auth}"} if auth else {}
            text = wrk.lua_script(method="POST" if test == "post" else "GET",
                                  body=POST_BODY if test == "post" else b"",
                                  headers=headers, keys_file=keys_file)
            path = self.tmp / "lua" / f"{len(self._scripts)}-{test}.lua"
            path.parent.mkdir(exist_ok=True)
            path.write_text(text)
            self._scripts[key] = path
        return self._scripts[key]

    def load(self, url: str, script: Path, lay: Layout, duration: float,
             connections: int | None = None) -> wrk.Result:
        return wrk.run(url, script, duration=duration,
                       connections=connections or self.s.connections, cpus=lay.load)

    def measure(self, target: str, workers: int, lay: Layout, base: str, auth: str | None,
                server: Server) -> None:
        """Warm up, then the GET and the POST run (and with one worker a GET on a single
        connection: latency without queueing); one row each, with the CPU the server (for
        ``direct``: the origin) used, in cores, and CPU microseconds per request."""
        get_url, post_url = f"{base}/small", f"{base}/echo"
        self.load(get_url, self.script("get", auth), lay, self.s.warmup)
        runs: list[tuple[str, str, int | None]] = [("get", get_url, None),
                                                   ("post", post_url, None)]
        if workers == 1:
            runs.append(("get1", get_url, 1))
        for test, url, connections in runs:
            script = self.script("post" if test == "post" else "get", auth)
            r = self.timed(server, url, script, lay, connections)
            self.rows.append({"target": target, "workers": workers, "test": test,
                              "connections": connections or self.s.connections,
                              "layout": lay.describe(), **r})
            log(f"  {report.LABELS[target]:<26} W={workers} {test.upper():<4} "
                f"{r['rps']:>9,.0f} req/s  p50 {r['p50_ms']:6.2f} ms  p99 {r['p99_ms']:6.2f} ms"
                f"  CPU {r['server_cores']:4.2f}  other CPU {r['foreign_cores']:4.2f}  "
                f"errors {r['errors']}")

    def timed(self, server: Server, url: str, script: Path, lay: Layout,
              connections: int | None = None) -> dict[str, Any]:
        """One wrk run with the CPU the server and the origin used (cores), the server's CPU
        microseconds per request, and the CPU other processes on the machine used meanwhile
        (``foreign_cores``). A run that others disturbed (more than ``--max-foreign`` cores)
        is repeated after the machine calms down, up to ``--retries`` times; the least
        disturbed attempt is kept."""
        origin = self.support[0]
        best: dict[str, Any] | None = None
        for attempt in range(1 + self.s.retries):
            if attempt:
                log(f"    disturbed: other processes used {best and best['foreign_cores']} "
                    "cores; waiting for quiet, then measuring again")
                wait_for_quiet(self.s.max_foreign, 120.0)
            cpu0, origin0, t0 = cpu_seconds(server.pid), cpu_seconds(origin.pid), time.monotonic()
            with CpuWatch([server, *self.support]) as watch:
                result = self.load(url, script, lay, self.s.duration, connections)
            wall = time.monotonic() - t0
            cores = (cpu_seconds(server.pid) - cpu0) / wall
            server.check()
            row = {**result.as_dict(), "server_cores": round(cores, 2),
                   "origin_cores": round((cpu_seconds(origin.pid) - origin0) / wall, 2),
                   "foreign_cores": round(watch.foreign, 2), "loadavg": loadavg()[0],
                   "cpu_us_per_request": round(cores * 1e6 / result.rps, 1) if result.rps
                   else None}
            if best is None or row["foreign_cores"] < best["foreign_cores"]:
                best = row
            if watch.foreign <= self.s.max_foreign:
                break
        assert best is not None
        best["attempts"] = attempt + 1
        return best

    # ---------------------------------------------------------------- phases

    def proxies(self, seeded: seed.Seeded, config: Path, port: int) -> None:
        """Per worker count: the throughput table, then streaming and the storm through the
        gateway that was just measured."""
        origin = f"http://127.0.0.1:{self.ports.origin}"
        wanted = self.s.phases
        for workers in self.s.workers:
            lay = layout(workers)
            self.place_support(lay)
            log(f"{workers} worker(s): {lay.describe()}")
            if "throughput" in wanted:
                self.measure("direct", workers, lay, f"{origin}/api", None, self.support[0])
                nport = free_port()
                folder = self.tmp / f"nginx{workers}"
                nginx = start_nginx(f"nginx proxy x{workers}", folder,
                                    proxy_conf(folder, nport, self.ports.origin, workers),
                                    lay.server)
                with running(nginx):
                    wait_http(nginx, nport, "/api/small")
                    self.measure("nginx", workers, lay, f"http://127.0.0.1:{nport}/api", None,
                                 nginx)
                bport = free_port()
                bare = python_server(f"bare proxy x{workers}", "bare_proxy.py",
                                     ["--upstream", origin, "--port", str(bport), "--workers",
                                      str(workers)], self.tmp / f"bare{workers}.log", lay.server)
                with running(bare):
                    wait_http(bare, bport, "/_bare/healthz")
                    wait_workers(bare, bport, "/_bare/healthz", workers)
                    self.measure("bare", workers, lay, f"http://127.0.0.1:{bport}/api", None,
                                 bare)
            gw = self.gateway(config, workers, lay, port, f"gateway-x{workers}")
            with running(gw):
                if "throughput" in wanted:
                    self.measure("gateway", workers, lay, f"http://127.0.0.1:{port}/bench",
                                 seeded.key, gw)
                if workers == 1 and "stream" in wanted:
                    self.stream(gw, port, seeded.key, lay)
                if "storm" in wanted:
                    self.storm(gw, port, seeded.storm_keys[f"storm-{workers}"], seeded.key,
                               workers, lay)
            if workers == 1 and "throughput" in wanted:  # what the access log line costs
                gw = self.gateway(config, workers, lay, port, "gateway-nolog",
                                  env={"GATEWAY_LOG_LEVEL": "WARNING"})
                with running(gw):
                    self.measure("gateway-nolog", workers, lay,
                                 f"http://127.0.0.1:{port}/bench", seeded.key, gw)

    def stream(self, gw: Server, port: int, key: str, lay: Layout) -> None:
        n = self.s.stream_bytes
        log(f"streaming {n / 2**30:g} GiB each way through the gateway (pid {gw.pid})")
        with client_on(lay.load), CpuWatch([gw, *self.support]) as watch:
            result = asyncio.run(scenarios.stream(port, key, gw.pid, n))
        gw.check()
        result["foreign_cores"] = round(watch.foreign, 2)
        self.results["stream"] = result
        for leg in ("download", "upload"):
            r = result[leg]
            log(f"  {leg:<8} {'ok' if r['ok'] else 'CONTENT MISMATCH'} {r['mib_per_s']:,.0f} "
                f"MiB/s, peak RSS {r['peak_rss_mib']} MiB (+{r['rss_growth_mib']})")

    def storm(self, gw: Server, port: int, key: str, warm_key: str, workers: int,
              lay: Layout) -> None:
        n = self.s.storm_requests
        log(f"refresh storm: {n} concurrent requests on an expired token, {workers} worker(s)")
        with client_on(lay.load), CpuWatch([gw, *self.support]) as watch:
            result = asyncio.run(scenarios.storm(port, key, self.ports.token, n, warm_key))
        gw.check()
        result["foreign_cores"] = round(watch.foreign, 2)
        result["workers"] = workers
        self.results["storm"].append(result)
        e, f = result["expired"], result["fresh"]
        log(f"  token endpoint calls: {result['token_calls']}; expired p50 {e['p50_ms']} ms "
            f"p99 {e['p99_ms']} ms max {e['max_ms']} ms {e['statuses']}; "
            f"fresh p99 {f['p99_ms']} ms")

    def scale(self) -> None:
        n = self.s.scale_identities
        lay = layout(1)
        self.place_support(lay)
        log(f"store scale: seeding a store with {n:,} identities, keys and connections")
        one_cfg, one_port = self.config("scale-one", "one.db")
        one = asyncio.run(seed.seed(one_cfg, keys_file=self.tmp / "one-keys.txt"))
        big_cfg, big_port = self.config("scale-big", "big.db")
        big = asyncio.run(seed.seed(big_cfg, identities=n, keys_file=self.tmp / "big-keys.txt"))
        api_per = asyncio.run(seed.time_api_path(self.tmp / "api-sample", self.enc_key))
        log(f"  bulk seeding took {big.bulk_seconds} s; the public API path takes "
            f"{api_per * 1000:.1f} ms per identity (~{api_per * n:.0f} s for {n:,})")
        hot_keys = self.tmp / "hot-keys.txt"
        hot_keys.write_text(big.key + "\n")
        out: dict[str, Any] = {"identities": big.identities, "seed_bulk_s": big.bulk_seconds,
                               "seed_api_ms_per_identity": round(api_per * 1000, 2)}
        runs = [("one", one_cfg, one_port, one.keys_file, "1 identity in the store"),
                ("hot", big_cfg, big_port, hot_keys, "one identity of many, cache warm"),
                ("spread", big_cfg, big_port, big.keys_file, "round robin over all keys")]
        servers: dict[Path, Server] = {}
        try:
            for name, cfg, port, keys, what in runs:
                if cfg not in servers:
                    for s in servers.values():
                        s.stop()
                    servers = {cfg: self.gateway(cfg, 1, lay, port, f"gateway-scale-{name}")}
                assert keys is not None
                script = self.script("get", None, keys)
                url = f"http://127.0.0.1:{port}/bench/small"
                if name != "spread":
                    self.load(url, script, lay, self.s.warmup)
                r = self.timed(servers[cfg], url, script, lay)
                out[name] = {"what": what, **r}
                log(f"  {name:<6} {what:<36} {r['rps']:>9,.0f} req/s  "
                    f"p99 {r['p99_ms']:6.2f} ms  CPU {r['server_cores']:4.2f}  other CPU "
                    f"{r['foreign_cores']:4.2f}  errors {r['errors']}")
        finally:
            for s in servers.values():
                s.stop()
        out["hot_vs_one"] = report._ratio(out["hot"]["rps"], out["one"]["rps"])
        out["spread_vs_one"] = report._ratio(out["spread"]["rps"], out["one"]["rps"])
        out["one_vs_hot_cpu_per_request"] = report._ratio(out["one"]["cpu_us_per_request"],
                                                          out["hot"]["cpu_us_per_request"])
        self.results["scale"] = out

    def startup(self, config: Path, port: int, key: str) -> None:
        log("start-up time")
        self.results["interpreter"] = scenarios.interpreter_costs()
        for workers in self.s.workers:
            lay = layout(workers)
            result = scenarios.startup(config, port, key, workers, self.s.startup_reps,
                                       self.tmp / f"startup{workers}.log", lay.server)
            self.results["startup"].append(result)
            log(f"  workers {workers}: healthz after {result['healthz_s']} s, first proxied "
                f"200 after {result['first_proxied_s']} s"
                + (f", all workers after {result['all_workers_s']} s"
                   if "all_workers_s" in result else ""))

    def run(self) -> dict[str, Any]:
        self.start_support()
        config, port = self.config("gateway", "gateway.db")
        storms = [f"storm-{w}" for w in self.s.workers]
        seeded = asyncio.run(seed.seed(config, storm=storms, token_port=self.ports.token))
        if self.s.phases & {"throughput", "stream", "storm"}:
            self.proxies(seeded, config, port)
        if "scale" in self.s.phases:
            self.scale()
        if "startup" in self.s.phases:
            self.startup(config, port, seeded.key)
        self.results["throughput"] = self.rows
        self.results["ratios"] = report.ratios(self.rows)
        self.results["targets"] = report.targets(self.results)
        return self.results

    def close(self) -> None:
        for server in reversed(self.support):
            server.stop()


# --------------------------------------------------------------------------- main


PHASES = ("throughput", "stream", "storm", "scale", "startup")


def settings(args: argparse.Namespace) -> Settings:
    quick = args.quick
    skip = set(args.skip or ())
    unknown = skip - set(PHASES)
    if unknown:
        raise SystemExit(f"--skip: unknown phase(s) {', '.join(sorted(unknown))}; "
                         f"choose from {', '.join(PHASES)}")
    return Settings(
        quick=quick,
        duration=args.duration or (3.0 if quick else 10.0),
        warmup=args.warmup or (1.0 if quick else 3.0),
        connections=args.connections,
        stream_bytes=args.stream_bytes or (2**28 if quick else 2**30),
        storm_requests=args.storm_requests,
        token_delay_ms=args.token_delay_ms,
        scale_identities=args.scale_identities,
        startup_reps=args.startup_reps or (1 if quick else 5),
        workers=tuple(args.workers),
        phases=frozenset(set(PHASES) - skip),
        retries=args.retries if args.retries is not None else (0 if quick else 2),
        max_foreign=args.max_foreign,
    )


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true",
                    help="3 s runs, 256 MiB streams, one start-up: about two minutes")
    ap.add_argument("--duration", type=float, help="seconds per wrk run (10; quick: 3)")
    ap.add_argument("--warmup", type=float, help="seconds of warm-up per server (3; quick: 1)")
    ap.add_argument("--connections", type=int, default=64, help="wrk connections (64)")
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2],
                    help="worker counts to compare (1 2)")
    ap.add_argument("--stream-bytes", type=int, help="bytes each way (1 GiB; quick: 256 MiB)")
    ap.add_argument("--storm-requests", type=int, default=1000)
    ap.add_argument("--token-delay-ms", type=float, default=100.0,
                    help="the token endpoint's answer time in the storm (100)")
    ap.add_argument("--scale-identities", type=int, default=100_000)
    ap.add_argument("--startup-reps", type=int, help="start-ups per worker count (5; quick: 1)")
    ap.add_argument("--skip", nargs="+", metavar="PHASE", help=f"skip phases: {PHASES}")
    ap.add_argument("--max-load", type=float, default=0.5,
                    help="wait until the 1-minute load average is below this (0.5)")
    ap.add_argument("--wait-idle", type=float, default=None,
                    help="give up waiting for low load after this many seconds "
                         "(600; quick: 0)")
    ap.add_argument("--max-foreign", type=float, default=0.15,
                    help="a wrk run during which other processes used more CPU (cores) than "
                         "this is disturbed (0.15)")
    ap.add_argument("--retries", type=int,
                    help="measure a disturbed run again up to this many times (2; quick: 0)")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "latest.json")
    ap.add_argument("--keep-temp", action="store_true", help="keep the temp dir (logs)")
    args = ap.parse_args()
    s = settings(args)
    # A SIGTERM (a timeout, a CI runner) unwinds normally, so every server we started stops.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    try:
        wrk.wrk_binary()
        nginx_binary()
    except BenchError as e:
        print(e, file=sys.stderr)
        return 2
    if raise_fd_limit() < 4 * s.storm_requests:
        print("warning: the open-files limit is low for the storm; try `ulimit -n 8192`",
              file=sys.stderr)
    idle = wait_until_idle(args.max_load, args.wait_idle if args.wait_idle is not None
                           else (0.0 if s.quick else 600.0))
    command = " ".join(["python", "bench/run.py", *sys.argv[1:]])
    tmp = Path(tempfile.mkdtemp(prefix="gateway-bench-"))
    log(f"{command}  (temp dir {tmp}, load average {idle['loadavg_at_start'][0]:.2f})")
    suite = Suite(s, tmp)
    started = time.time()
    try:
        results = suite.run()
    except BenchError as e:
        print(f"benchmark failed: {e}", file=sys.stderr)
        return 1
    finally:
        suite.close()
        if not args.keep_temp:
            shutil.rmtree(tmp, ignore_errors=True)
    results["meta"] = {
        "command": command, "started": time.strftime("%Y-%m-%d %H:%M:%S %Z",
                                                     time.localtime(started)),
        "seconds": round(time.time() - started, 1), "machine": machine(), **idle,
        "loadavg_at_end": loadavg(),
        "settings": _fields(s),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print()
    print(report.text_table(results["throughput"]))
    print()
    for t in results["targets"]:
        met = {True: "met", False: "MISSED", None: "n/a"}[t["met"]]
        print(f"{met:>6}  {t['target']}: {t['value']} (goal {t['goal']})")
    print(f"\nresults: {args.out}  ({results['meta']['seconds']} s)")
    return 0


def _fields(s: Settings) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name in Settings.__slots__:  # type: ignore[attr-defined]
        value = getattr(s, name)
        out[name] = sorted(value) if isinstance(value, frozenset) else value
    return out


if __name__ == "__main__":
    sys.exit(main())
