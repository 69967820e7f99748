"""Fixtures for the operations features: an in-process gateway with operations settings,
log capture through the real redaction layer, and real `gateway serve` processes."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from yarl import URL

from gateway.accesslog import StructuredFormatter
from gateway.app import OpsSettings, create_app
from gateway.config import Config
from tests.fakes.authserver import FakeAuthServer, start_auth_server
from tests.fakes.upstream import start_upstream
from tests.integration.conftest import Clock, Gateway

REPO = Path(__file__).resolve().parents[2]
ADMIN_KEY = "adm_" + "k" * 40
PASSWORD = "correct horse battery"


# --------------------------------------------------------------------------- in-process


@dataclass
class RecordedResponse:
    url: str
    status: int
    headers: list[tuple[str, str]]
    body: bytes


@dataclass
class Recorder:
    """Every response a client session received, body included (read eagerly)."""

    responses: list[RecordedResponse] = field(default_factory=list)

    def response_class(self) -> type[aiohttp.ClientResponse]:
        recorder = self

        class Recording(aiohttp.ClientResponse):
            async def start(self, connection: Any) -> aiohttp.ClientResponse:
                await super().start(connection)
                body = await self.read()
                recorder.responses.append(RecordedResponse(
                    str(self.url), self.status, list(self.headers.items()), body))
                return self

        return Recording


async def scrape(gw: Gateway) -> str:
    async with aiohttp.ClientSession() as c, c.get(gw.url / "_gateway/metrics") as r:
        assert r.status == 200
        assert r.headers["Content-Type"].startswith("text/plain")
        return await r.text()


def sample(text: str, name: str, **labels: str) -> float:
    """The value of one sample in Prometheus text output (0 if absent)."""
    total = 0.0
    for line in text.splitlines():
        if line.startswith("#") or not line.startswith(name):
            continue
        head, _, value = line.rpartition(" ")
        metric, _, rest = head.partition("{")
        if metric != name:
            continue
        got = dict(part.split("=", 1) for part in rest.rstrip("}").split(",") if part)
        got = {k: v.strip('"') for k, v in got.items()}
        if all(got.get(k) == v for k, v in labels.items()):
            total += float(value)
    return total


@pytest.fixture
async def ops_gateway(aiohttp_server: Callable[..., Any],
                      unused_tcp_port_factory: Callable[[], int],
                      write_config: Callable[..., Config]) -> AsyncIterator[Callable[..., Any]]:
    """Like tests/integration's ``make_gateway``, with ``ops=OpsSettings(...)``."""
    made: list[Gateway] = []

    async def make(ops: OpsSettings | None = None, config: dict[str, Any] | None = None,
                   provider: dict[str, Any] | None = None, auth: FakeAuthServer | None = None,
                   **auth_knobs: Any) -> Gateway:
        fake_auth = await start_auth_server(aiohttp_server, auth, **auth_knobs)
        upstream = await start_upstream(aiohttp_server)
        port = unused_tcp_port_factory()
        data: dict[str, Any] = {
            "server": {"host": "127.0.0.1", "port": port,
                       "public_url": f"http://127.0.0.1:{port}"},
            "providers": {"fake": fake_auth.config_entry(upstream=str(upstream.url / "api"),
                                                         **(provider or {}))},
        }
        for k, v in (config or {}).items():
            data[k] = {**data.get(k, {}), **v} if isinstance(v, dict) else v
        cfg = write_config(data)
        clock = Clock()
        app = create_app(cfg, clock=clock, ops=ops or OpsSettings(admin_key=ADMIN_KEY))
        server = await aiohttp_server(app, port=port)
        gw = Gateway(fake_auth, upstream, server, app, clock, cfg)
        made.append(gw)
        return gw

    yield make
    for gw in made:
        for s in gw.sessions:
            await s.close()


def access_lines(caplog: pytest.LogCaptureFixture) -> list[dict[str, Any]]:
    """The ``gateway.access`` records, as the JSON lines the gateway would write."""
    fmt = StructuredFormatter("json")
    return [json.loads(fmt.format(r)) for r in caplog.records if r.name == "gateway.access"]


# --------------------------------------------------------------------------- processes


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class ServedGateway:
    """``python -m gateway serve`` as a real process; its stderr is parsed as JSON lines."""

    def __init__(self, config_path: Path, port: int, workers: int, pidfile: Path,
                 env: dict[str, str] | None = None) -> None:
        self.config_path, self.port, self.pidfile = config_path, port, pidfile
        self.url = URL(f"http://127.0.0.1:{port}")
        self.lines: list[dict[str, Any]] = []
        self.raw: list[str] = []
        self._cond = threading.Condition()
        full_env = {**os.environ, "PYTHONPATH": str(REPO), **(env or {})}
        full_env.pop("PROMETHEUS_MULTIPROC_DIR", None)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "gateway", "serve", "--config", str(config_path),
             "--workers", str(workers), "--pidfile", str(pidfile)],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=full_env, cwd=REPO)
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for raw in self.proc.stderr:
            text = raw.decode("utf-8", "replace").rstrip("\n")
            try:
                line = json.loads(text)
            except ValueError:
                line = {"msg": text, "pid": None, "logger": "?"}
            with self._cond:
                self.raw.append(text)
                self.lines.append(line)
                self._cond.notify_all()

    def wait_log(self, predicate: Callable[[dict[str, Any]], bool], count: int = 1,
                 timeout: float = 20.0, start: int = 0) -> list[dict[str, Any]]:
        """Block until ``count`` lines (from index ``start``) satisfy ``predicate``."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                found = [ln for ln in self.lines[start:] if predicate(ln)]
                if len(found) >= count:
                    return found
                left = deadline - time.monotonic()
                if left <= 0 or (self.proc.poll() is not None and not self._reader.is_alive()):
                    raise AssertionError(f"log line not seen; log:\n{self.log_text()}")
                self._cond.wait(left)

    def mark(self) -> int:
        with self._cond:
            return len(self.lines)

    def log_text(self) -> str:
        return "\n".join(self.raw[-80:])

    def get(self, path: str, timeout: float = 5.0, headers: dict[str, str] | None = None
            ) -> tuple[int, dict[str, str], bytes]:
        """One request on a new connection (so SO_REUSEPORT may pick any worker)."""
        import http.client

        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        try:
            conn.request("GET", path, headers=headers or {})
            resp = conn.getresponse()
            return resp.status, dict(resp.getheaders()), resp.read()
        finally:
            conn.close()

    def wait_ready(self, path: str = "/_gateway/healthz", attempts: int = 400) -> None:
        """Poll the health endpoint until it answers (the start signal)."""
        for _ in range(attempts):
            if self.proc.poll() is not None:
                raise AssertionError(f"server exited with {self.proc.returncode}:\n"
                                     f"{self.log_text()}")
            with contextlib.suppress(OSError):
                if self.get(path, timeout=1.0)[0] == 200:
                    return
            with self._cond:  # wait for the next log line (or a short while) before retrying
                self._cond.wait(0.05)
        raise AssertionError(f"server never became healthy:\n{self.log_text()}")

    def pids_serving(self, want: set[int], attempts: int = 300) -> Counter[int]:
        """Open new connections until healthz has answered from every pid in ``want``;
        returns how many answers came from each pid."""
        seen: Counter[int] = Counter()
        for _ in range(attempts):
            status, _, body = self.get("/_gateway/healthz")
            assert status == 200
            seen[json.loads(body)["pid"]] += 1
            if want <= set(seen):
                break
        return seen

    def signal(self, sig: int) -> None:
        self.proc.send_signal(sig)

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(30)
        finally:
            self._reader.join(5)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)
        self._reader.join(5)
        if self.proc.stderr is not None:
            self.proc.stderr.close()


@pytest.fixture
def serve(tmp_path: Path) -> Iterator[Callable[..., ServedGateway]]:
    started: list[ServedGateway] = []

    def start(config: dict[str, Any], workers: int = 2) -> ServedGateway:
        path = tmp_path / "config.yaml"
        path.write_text(yaml.safe_dump(config))
        port = int(config["server"]["port"])
        gw = ServedGateway(path, port, workers, tmp_path / "gw.pid")
        started.append(gw)
        return gw

    yield start
    for gw in started:
        gw.close()


def base_config(encryption_key: str, port: int, providers: dict[str, Any],
                **server: Any) -> dict[str, Any]:
    return {
        "server": {"host": "127.0.0.1", "port": port, "public_url": f"http://127.0.0.1:{port}",
                   **server},
        "store": {"url": "sqlite:///gateway.db"},
        "encryption_key": encryption_key,
        "providers": providers,
    }


# --------------------------------------------------------------------------- the CLI


@dataclass
class CliResult:
    code: int
    out: str
    err: str


@pytest.fixture
def cli(capsys: pytest.CaptureFixture[str]) -> Callable[..., Any]:
    """``await cli(*argv)``: gateway.cli.main in a thread (it runs its own event loop)."""
    import asyncio

    from gateway.cli import main

    async def run(*argv: str) -> CliResult:
        capsys.readouterr()
        code = await asyncio.to_thread(main, list(argv))
        out, err = capsys.readouterr()
        assert "Traceback" not in err
        return CliResult(code, out, err)

    return run
