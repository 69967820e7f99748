"""Running wrk and reading its result.

Each run gets a generated Lua script: it sets the method, body and headers of the request
and, in wrk's ``done`` hook, prints one ``BENCH_JSON {...}`` line with the exact
percentiles from wrk's latency histogram (microseconds) and its error counters, so nothing
depends on wrk's human-readable output. ``keys_file`` makes every request carry the next
gateway key of a file (round robin), for the store-scale test.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from bench.harness import BenchError, taskset

MARK = "BENCH_JSON "

_DONE = r"""
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'BENCH_JSON {"requests":%d,"duration_us":%d,"bytes":%d,"connect":%d,"read":%d,' ..
    '"write":%d,"status":%d,"timeout":%d,"p50_us":%d,"p90_us":%d,"p99_us":%d,' ..
    '"p999_us":%d,"max_us":%d,"mean_us":%.1f}\n',
    summary.requests, summary.duration, summary.bytes, e.connect, e.read, e.write,
    e.status, e.timeout, latency:percentile(50), latency:percentile(90),
    latency:percentile(99), latency:percentile(99.9), latency.max, latency.mean))
end
"""


@dataclass(frozen=True, slots=True)
class Result:
    """One wrk run. Latencies in milliseconds; ``errors`` counts socket errors, timeouts and
    non-2xx/3xx answers (a run with errors does not measure what it claims to)."""

    requests: int
    seconds: float
    rps: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    p999_ms: float
    max_ms: float
    mean_ms: float
    errors: int
    non_2xx: int
    mib_per_s: float

    def as_dict(self) -> dict[str, float | int]:
        return asdict(self)


def _lua_string(value: str) -> str:
    return json.dumps(value)  # a JSON string literal is a valid Lua string literal here


def lua_script(*, method: str = "GET", body: bytes = b"",
               headers: Mapping[str, str] | None = None, keys_file: Path | None = None) -> str:
    """The Lua for one run (see the module docstring)."""
    lines = [f"wrk.method = {_lua_string(method)}"]
    if body:
        if set(body) != {body[0]}:
            raise ValueError("only single-byte-pattern bodies are supported")
        lines.append(f'wrk.body = string.rep({_lua_string(chr(body[0]))}, {len(body)})')
        lines.append('wrk.headers["Content-Type"] = "application/octet-stream"')
    for name, value in (headers or {}).items():
        lines.append(f"wrk.headers[{_lua_string(name)}] = {_lua_string(value)}")
    if keys_file is not None:
        lines.append(f"""
local keys, n, i = {{}}, 0, 0
for line in io.lines({_lua_string(str(keys_file))}) do n = n + 1; keys[n] = line end
request = function()
  i = i % n + 1
  wrk.headers["Authorization"] = "Bearer " .. keys[i]
  return wrk.format()
end""")
    lines.append(_DONE)
    return "\n".join(lines) + "\n"


def parse(output: str) -> Result:
    """The :class:`Result` from wrk's output (the ``BENCH_JSON`` line our script prints)."""
    for line in output.splitlines():
        if line.startswith(MARK):
            d = json.loads(line[len(MARK):])
            break
    else:
        raise BenchError(f"wrk printed no result line; its output:\n{output[-2000:]}")
    seconds = d["duration_us"] / 1e6
    if seconds <= 0:
        raise BenchError("wrk reported a zero-length run")
    errors = d["connect"] + d["read"] + d["write"] + d["timeout"] + d["status"]
    return Result(
        requests=d["requests"], seconds=round(seconds, 3),
        rps=round(d["requests"] / seconds, 1),
        p50_ms=d["p50_us"] / 1000, p90_ms=d["p90_us"] / 1000, p99_ms=d["p99_us"] / 1000,
        p999_ms=d["p999_us"] / 1000, max_ms=d["max_us"] / 1000,
        mean_ms=round(d["mean_us"] / 1000, 3), errors=errors, non_2xx=d["status"],
        mib_per_s=round(d["bytes"] / seconds / 2**20, 2))


def wrk_binary() -> str:
    found = shutil.which("wrk")
    if found is None:
        raise BenchError("wrk not found: apt-get install wrk (see docs/benchmarks.md)")
    return found


def run(url: str, script: Path, *, duration: float, connections: int, threads: int = 1,
        cpus: Sequence[int] | None = None, timeout_s: int = 10) -> Result:
    """One wrk run with ``script`` against ``url``."""
    threads = max(1, min(threads, connections))
    cmd = taskset([wrk_binary(), "-t", str(threads), "-c", str(connections),
                   "-d", f"{max(1, round(duration))}s", "--timeout", f"{timeout_s}s",
                   "--latency", "-s", str(script), url], cpus)
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, check=False,
                              timeout=duration + timeout_s + 30)
    except subprocess.TimeoutExpired:
        raise BenchError(f"wrk against {url} did not finish") from None
    if done.returncode != 0:
        raise BenchError(f"wrk failed ({done.returncode}): {done.stderr.strip()[-500:]}")
    return parse(done.stdout)
