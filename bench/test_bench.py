"""Tests of the benchmark suite's own logic: ``.venv/bin/pytest bench -q``.

The pure parts (wrk script and result parsing, ratios and targets, CPU layout, profile
aggregation) are table-tested; one smoke test runs real nginx and wrk against the bare proxy
for a second (skipped where they are not installed).
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest

from bench import harness, profile, report, scenarios, wrk
from bench.harness import BenchError, Layout, layout

WRK_OUTPUT = """Running 1s test @ http://127.0.0.1:1/api/small
  1 threads and 8 connections
BENCH_JSON {"requests":5000,"duration_us":2000000,"bytes":1048576,"connect":0,"read":1,\
"write":0,"status":3,"timeout":2,"p50_us":1500,"p90_us":2500,"p99_us":9000,"p999_us":12000,\
"max_us":15000,"mean_us":1700.5}
"""


# --------------------------------------------------------------------------- wrk


def test_parse_reads_the_result_line() -> None:
    r = wrk.parse(WRK_OUTPUT)
    assert r.requests == 5000 and r.seconds == 2.0 and r.rps == 2500.0
    assert (r.p50_ms, r.p90_ms, r.p99_ms, r.p999_ms, r.max_ms) == (1.5, 2.5, 9.0, 12.0, 15.0)
    assert r.errors == 6 and r.non_2xx == 3  # read + timeout + status
    assert r.mib_per_s == 0.5


@pytest.mark.parametrize("output", ["", "Running 1s test\n", "BENCH_JSON {\"requests\": 1,"
                                    "\"duration_us\": 0, \"bytes\": 0, \"connect\": 0, \"read\":"
                                    " 0, \"write\": 0, \"status\": 0, \"timeout\": 0, \"p50_us\":"
                                    " 0, \"p90_us\": 0, \"p99_us\": 0, \"p999_us\": 0, "
                                    "\"max_us\": 0, \"mean_us\": 0}"])
def test_parse_refuses_output_without_a_usable_result(output: str) -> None:
    with pytest.raises(BenchError):
        wrk.parse(output)


def test_lua_script_sets_method_body_and_headers() -> None:
    text = wrk.lua_script(method="POST", body=b"x" * 4096,
                          headers={"Authorization": 'Bearer a"b'})
    assert 'wrk.method = "POST"' in text
    assert 'wrk.body = string.rep("x", 4096)' in text
    assert 'wrk.headers["Authorization"] = "Bearer a\\"b"' in text  # quoted, not broken out
    assert "done = function(summary, latency, requests)" in text
    assert "request = function" not in text  # static requests: wrk's fast path


def test_lua_script_rotates_keys_from_a_file(tmp_path: Path) -> None:
    text = wrk.lua_script(keys_file=tmp_path / "keys.txt")
    assert f'io.lines("{tmp_path / "keys.txt"}")' in text
    assert 'wrk.headers["Authorization"] = "Bearer " .. keys[i]' in text


def test_lua_script_refuses_bodies_it_cannot_express() -> None:
    with pytest.raises(ValueError):
        wrk.lua_script(method="POST", body=b"ab")


# --------------------------------------------------------------------------- report


def _row(target: str, workers: int, test: str, rps: float, p99: float,
         us: float | None = None) -> dict[str, Any]:
    return {"target": target, "workers": workers, "test": test, "rps": rps, "p50_ms": 1.0,
            "p99_ms": p99, "errors": 0, "cpu_us_per_request": us}


ROWS = [_row("direct", 1, "get", 80_000, 1.0), _row("nginx", 1, "get", 40_000, 2.0),
        _row("bare", 1, "get", 10_000, 11.0, 90.0), _row("gateway", 1, "get", 9_000, 13.0, 100.0)]


def test_ratios_compare_the_gateway_with_the_bare_proxy_and_nginx() -> None:
    r = report.ratios(ROWS)["w1.get"]
    assert r["gateway_vs_bare_rps"] == 0.9
    assert r["gateway_vs_nginx_rps"] == 0.225
    assert r["added_p99_gateway_ms"] == 12.0 and r["added_p99_bare_ms"] == 10.0
    assert r["added_p99_ratio"] == 1.2
    assert r["bare_vs_gateway_cpu_per_request"] == 0.9
    assert "w1.post" not in report.ratios(ROWS)  # nothing measured, nothing claimed


def test_targets_report_met_missed_and_not_applicable() -> None:
    rows = [*ROWS, _row("direct", 2, "get", 1, 5.0), _row("bare", 2, "get", 100, 4.0),
            _row("gateway", 2, "get", 50, 20.0)]
    results = {
        "ratios": report.ratios(rows),
        "stream": {"bytes": 2**30, "rss_growth_mib": 70.0, "download": {"ok": True},
                   "upload": {"ok": True}},
        "storm": [{"requests": 1000, "workers": 1, "token_calls": 1},
                  {"requests": 1000, "workers": 2, "token_calls": 2}],
        "scale": {"identities": 100_000, "hot_vs_one": 0.95},
    }
    met = {t["target"]: t["met"] for t in report.targets(results)}
    assert met["throughput w1.get: gateway / bare"] is True
    assert met["added p99 w1.get: gateway / bare"] is True
    assert met["throughput w2.get: gateway / bare"] is False
    assert met["added p99 w2.get: gateway / bare"] is None  # the bare proxy added nothing
    assert met["RSS growth streaming 1 GiB each way (MiB)"] is False
    assert met["token endpoint calls, storm of 1000 (workers 1)"] is True
    assert met["token endpoint calls, storm of 1000 (workers 2)"] is False
    assert met["throughput with 100,000 identities / with one"] is True


def test_a_corrupt_stream_misses_its_target_whatever_the_rss() -> None:
    results = {"stream": {"bytes": 2**30, "rss_growth_mib": 1.0, "download": {"ok": False},
                          "upload": {"ok": True}}}
    assert [t["met"] for t in report.targets(results)] == [False]


def test_tables_render_every_row() -> None:
    md = report.markdown({"throughput": ROWS, "targets": report.targets(
        {"ratios": report.ratios(ROWS)})})
    assert md.count("| 1 |") == len(ROWS) and "bare aiohttp proxy" in md
    assert "| yes |" in md
    assert len(report.text_table(ROWS).splitlines()) == len(ROWS) + 2


# --------------------------------------------------------------------------- harness


@pytest.mark.parametrize(("workers", "cpus", "expected"), [
    (1, (0, 1), Layout((0,), (1,))),
    (2, (0, 1), Layout((0, 1), (0, 1))),
    (1, (0,), Layout((0,), (0,))),
    (2, (0, 1, 2, 3), Layout((0, 1), (2, 3))),
])
def test_layout_gives_the_load_the_cpus_the_servers_leave(
        workers: int, cpus: tuple[int, ...], expected: Layout) -> None:
    assert layout(workers, cpus) == expected
    assert expected.pinned == (expected.server != expected.load)


def test_nginx_configs_stay_on_loopback_and_inject_the_header(tmp_path: Path) -> None:
    proxy = harness.proxy_conf(tmp_path, 8001, 8002, 2)
    assert "listen 127.0.0.1:8001" in proxy and "server 127.0.0.1:8002" in proxy
    assert 'proxy_set_header Authorization "Bearer static-benchmark-token"' in proxy
    assert "worker_processes 2;" in proxy and f"pid {tmp_path}/nginx.pid" in proxy
    origin = harness.origin_conf(tmp_path, 8002)
    assert "listen 127.0.0.1:8002" in origin and "return 200" in origin


# --------------------------------------------------------------------------- profile, stats


def test_profile_aggregates_own_and_inclusive_time() -> None:
    lines = ["main (a/app.py);handle (gateway/proxy/handler.py);_write (aiohttp/http_writer.py) 3",
             "main (a/app.py);handle (gateway/proxy/handler.py) 1",
             "data_received (aiohttp/client_proto.py) 2",
             "not a stack line"]
    total, by_package, own, inclusive = profile.aggregate(lines)
    assert total == 6
    assert by_package == {"aiohttp": 5, "gateway": 1}
    assert own["handle (gateway/proxy/handler.py)"] == 1
    assert inclusive["handle (gateway/proxy/handler.py)"] == 4
    assert profile.package("<frozen runpy>") == "<frozen runpy>"


@pytest.mark.parametrize(("q", "expected"), [(50, 50), (99, 99), (100, 100), (0, 1)])
def test_percentile_is_nearest_rank(q: float, expected: float) -> None:
    assert scenarios.percentile([float(x) for x in range(100, 0, -1)], q) == expected


# --------------------------------------------------------------------------- smoke


@pytest.mark.skipif(shutil.which("wrk") is None or shutil.which("nginx") is None,
                    reason="needs wrk and nginx (apt-get install nginx wrk)")
def test_wrk_through_the_bare_proxy_to_the_nginx_origin(tmp_path: Path) -> None:
    origin_port, proxy_port = harness.free_port(), harness.free_port()
    origin = harness.start_nginx("origin", tmp_path / "origin",
                                 harness.origin_conf(tmp_path / "origin", origin_port), None)
    with harness.running(origin):
        harness.wait_http(origin, origin_port, "/api/small")
        bare = harness.python_server("bare", "bare_proxy.py", [
            "--upstream", f"http://127.0.0.1:{origin_port}", "--port", str(proxy_port)],
            tmp_path / "bare.log", None)
        with harness.running(bare):
            harness.wait_http(bare, proxy_port, "/_bare/healthz")
            status, body = harness.get(proxy_port, "/api/small")
            assert status == 200 and b"bench-origin" in body
            script = tmp_path / "post.lua"
            script.write_text(wrk.lua_script(method="POST", body=b"x" * 4096))
            result = wrk.run(f"http://127.0.0.1:{proxy_port}/api/echo", script, duration=1,
                             connections=4)
    assert result.requests > 0 and result.errors == 0
    assert not origin.alive() and not bare.alive()
