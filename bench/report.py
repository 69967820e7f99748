"""Ratios, targets and tables from one run's results (pure functions over the results dict).

    python bench/report.py bench/results/latest.json     # the Markdown tables of a run

The targets come from the benchmark issue; they are reported, never asserted by a test:

* gateway throughput >= 0.85 x the bare aiohttp proxy with the same workers;
* added p99 latency (p99 through the proxy minus p99 of the origin directly, same layout)
  <= 1.3 x the bare proxy's, under the full load and on a single connection (``get1``:
  latency without queueing);
* RSS growth < 64 MiB while 1 GiB streams each way;
* exactly one token endpoint call per refresh storm;
* throughput with 100,000 identities in the store within 10% of that with one.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

Row = Mapping[str, Any]

THROUGHPUT_MIN = 0.85
ADDED_P99_MAX = 1.3
RSS_GROWTH_MAX_MIB = 64.0
SCALE_MIN = 0.90

LABELS = {"direct": "origin directly", "nginx": "nginx, static header",
          "bare": "bare aiohttp proxy", "gateway": "gateway",
          "gateway-nolog": "gateway, access log off"}


def find(rows: Sequence[Row], target: str, workers: int, test: str) -> Row | None:
    for r in rows:
        if r["target"] == target and r["workers"] == workers and r["test"] == test:
            return r
    return None


def _ratio(a: float, b: float) -> float | None:
    return round(a / b, 3) if b else None


def ratios(rows: Sequence[Row]) -> dict[str, dict[str, float | None]]:
    """Per ``w<workers>.<test>``: the gateway against the bare proxy and nginx, and the
    latency each proxy adds to the origin's."""
    out: dict[str, dict[str, float | None]] = {}
    for workers in sorted({int(r["workers"]) for r in rows}):
        for test in ("get", "post", "get1"):
            d, b = find(rows, "direct", workers, test), find(rows, "bare", workers, test)
            g, n = find(rows, "gateway", workers, test), find(rows, "nginx", workers, test)
            if g is None or b is None:
                continue
            r: dict[str, float | None] = {
                "gateway_vs_bare_rps": _ratio(g["rps"], b["rps"]),
                "gateway_vs_bare_p99": _ratio(g["p99_ms"], b["p99_ms"]),
            }
            if g.get("cpu_us_per_request") and b.get("cpu_us_per_request"):
                # The server's CPU per request: steadier than req/s when wrk shares the CPUs.
                r["bare_vs_gateway_cpu_per_request"] = _ratio(b["cpu_us_per_request"],
                                                              g["cpu_us_per_request"])
            if n is not None:
                r["gateway_vs_nginx_rps"] = _ratio(g["rps"], n["rps"])
                r["bare_vs_nginx_rps"] = _ratio(b["rps"], n["rps"])
            if d is not None:
                added_g = g["p99_ms"] - d["p99_ms"]
                added_b = b["p99_ms"] - d["p99_ms"]
                r["added_p99_gateway_ms"] = round(added_g, 2)
                r["added_p99_bare_ms"] = round(added_b, 2)
                r["added_p99_ratio"] = _ratio(added_g, added_b) if added_b > 0 else None
            nolog = find(rows, "gateway-nolog", workers, test)
            if nolog is not None:
                r["gateway_nolog_vs_bare_rps"] = _ratio(nolog["rps"], b["rps"])
            out[f"w{workers}.{test}"] = r
    return out


def targets(results: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Each target with the measured value and whether it holds."""
    out: list[dict[str, Any]] = []

    def add(name: str, value: float | None, goal: str, ok: bool | None) -> None:
        out.append({"target": name, "value": value, "goal": goal, "met": ok})

    for key, r in results.get("ratios", {}).items():
        v = r.get("gateway_vs_bare_rps")
        if not key.endswith("get1"):  # one connection: a latency run, not a throughput one
            add(f"throughput {key}: gateway / bare", v, f">= {THROUGHPUT_MIN}",
                None if v is None else v >= THROUGHPUT_MIN)
        v = r.get("added_p99_ratio")
        add(f"added p99 {key}: gateway / bare", v, f"<= {ADDED_P99_MAX}",
            None if v is None else v <= ADDED_P99_MAX)
    stream = results.get("stream")
    if stream:
        v = stream["rss_growth_mib"]
        ok = v < RSS_GROWTH_MAX_MIB and stream["download"]["ok"] and stream["upload"]["ok"]
        add(f"RSS growth streaming {stream['bytes'] / 2**30:g} GiB each way (MiB)", v,
            f"< {RSS_GROWTH_MAX_MIB:g}", ok)
    for s in results.get("storm", []):
        add(f"token endpoint calls, storm of {s['requests']} (workers {s['workers']})",
            s["token_calls"], "== 1", s["token_calls"] == 1)
    scale = results.get("scale")
    if scale:
        v = scale.get("hot_vs_one")
        add(f"throughput with {scale['identities']:,} identities / with one", v,
            f">= {SCALE_MIN}", None if v is None else v >= SCALE_MIN)
    return out


# --------------------------------------------------------------------------- tables


def _f(value: Any, digits: int = 2) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:,.{digits}f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def _test(test: str) -> str:
    """``GET``, ``POST``; ``GET/1`` for the single-connection latency run."""
    return "GET/1" if test == "get1" else test.upper()


def throughput_table(rows: Sequence[Row]) -> str:
    lines = ["| workers | path | test | req/s | p50 ms | p99 ms | server CPU | CPU us/req "
             "| other CPU | errors |", "|---|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['workers']} | {LABELS.get(r['target'], r['target'])} | "
                     f"{_test(r['test'])} | {_f(r['rps'], 0)} | {_f(r['p50_ms'])} | "
                     f"{_f(r['p99_ms'])} | {_f(r.get('server_cores'))} | "
                     f"{_f(r.get('cpu_us_per_request'), 0)} | {_f(r.get('foreign_cores'))} | "
                     f"{r['errors']} |")
    return "\n".join(lines)


def targets_table(items: Sequence[Mapping[str, Any]]) -> str:
    lines = ["| target | measured | goal | met |", "|---|---:|---|---|"]
    for t in items:
        met = {True: "yes", False: "**no**", None: "n/a"}[t["met"]]
        lines.append(f"| {t['target']} | {_f(t['value'], 3)} | {t['goal']} | {met} |")
    return "\n".join(lines)


def markdown(results: Mapping[str, Any]) -> str:
    parts = ["### Throughput and latency", "", throughput_table(results.get("throughput", [])),
             "", "### Targets", "", targets_table(results.get("targets", []))]
    return "\n".join(parts) + "\n"


def text_table(rows: Sequence[Row]) -> str:
    """The throughput rows for a terminal."""
    head = (f"{'W':>2}  {'path':<26} {'test':<5} {'req/s':>9} {'p50 ms':>8} {'p99 ms':>8} "
            f"{'CPU':>5} {'us/req':>7} {'other':>6} {'err':>5}")
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(f"{r['workers']:>2}  {LABELS.get(r['target'], r['target']):<26} "
                     f"{_test(r['test']):<5} {r['rps']:>9,.0f} {r['p50_ms']:>8.2f} "
                     f"{r['p99_ms']:>8.2f} {r.get('server_cores') or 0:>5.2f} "
                     f"{r.get('cpu_us_per_request') or 0:>7.0f} "
                     f"{r.get('foreign_cores') or 0:>6.2f} {r['errors']:>5}")
    return "\n".join(lines)


def main(argv: Sequence[str]) -> int:
    if len(argv) != 1:
        print("usage: python bench/report.py RESULTS.json", file=sys.stderr)
        return 2
    print(markdown(json.loads(Path(argv[0]).read_text())))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
