"""Several real gateway processes (``python -m gateway serve``) sharing one store.

The fake authorization server and upstream run in the test process (``aiohttp_server``); the
store is a SQLite file in ``tmp_path`` or a fresh PostgreSQL schema (``?search_path=``),
created before and dropped after the test. The test process seeds it through the store API
with the same encryption key the gateways use. Readiness is polled on ``/_gateway/healthz``;
what a gateway is doing is observed through its ``/_gateway/metrics`` (requests in flight),
never waited for with sleeps.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import time
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from yarl import URL

from gateway.config import Config
from gateway.identities import IdentityService
from gateway.store import create_store
from gateway.store.base import Connection, Identity, Store, TokenFields
from gateway.tokens.crypto import SecretBox, decode_key
from tests.fakes.authserver import FakeAuthServer, start_auth_server
from tests.fakes.upstream import FakeUpstream
from tests.store.conftest import pg_schema

REPO = Path(__file__).resolve().parents[2]
START_TIMEOUT = 30.0  # seconds for a gateway process to answer /_gateway/healthz
STOP_TIMEOUT = 10.0
POLL = 0.02  # seconds between polls of a gateway's health or metrics


class LiveUpstream(FakeUpstream):
    """The fake upstream, accepting exactly the access tokens the fake server considers
    valid right now (so a revoked or expired token gets the upstream's 401)."""

    auth: FakeAuthServer

    def _authorized(self, request: web.Request) -> bool:
        scheme, _, token = request.headers.get("Authorization", "").partition(" ")
        return scheme == "Bearer" and self.auth.is_valid_access_token(token) is not None

    def bearers(self) -> list[str]:
        """The access token of every request, in arrival order."""
        return [(r.header("Authorization") or "").removeprefix("Bearer ") for r in self.requests]


class HeldAnswers(FakeAuthServer):
    """The fake server, able to hold its *answers*: a token request is fully processed
    (a refresh token rotated, new tokens issued), then waits until released. A client killed
    meanwhile never learns what the provider did."""

    def __init__(self, **knobs: Any) -> None:
        super().__init__(**knobs)
        self.answer_gate = asyncio.Event()
        self.answer_gate.set()
        self.answered = 0
        self._answered_changed = asyncio.Event()

    def hold_answers(self) -> None:
        self.answer_gate.clear()

    def release_answers(self) -> None:
        self.answer_gate.set()

    async def wait_answered(self, n: int) -> None:
        while self.answered < n:
            self._answered_changed.clear()
            await self._answered_changed.wait()

    def make_app(self) -> web.Application:
        app = super().make_app()

        async def open_gate(_: web.Application) -> None:
            self.answer_gate.set()  # never leave a held answer blocking shutdown

        app.on_shutdown.append(open_gate)
        return app

    async def _token(self, request: web.Request) -> web.StreamResponse:
        response = await super()._token(request)
        self.answered += 1
        self._answered_changed.set()
        await self.answer_gate.wait()
        return response


@dataclass
class Instance:
    """One ``gateway serve`` process on its own port."""

    name: str
    proc: asyncio.subprocess.Process
    port: int
    log: Path

    @property
    def url(self) -> URL:
        return URL.build(scheme="http", host="127.0.0.1", port=self.port)

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"


@dataclass
class Cluster:
    kind: str
    auth: FakeAuthServer
    upstream: LiveUpstream
    config: Config
    store_url: str
    box: SecretBox
    http: aiohttp.ClientSession
    tmp: Path
    ports: Callable[[], int]
    alice: Identity | None = None
    api_key: str = ""
    instances: list[Instance] = field(default_factory=list)

    # -- the store, as seen from the test process -------------------------------------

    async def store(self) -> Store:
        store = create_store(self.config.store, self.box)
        await store.open()
        return store

    async def seed(self, expires_in: float) -> TokenFields:
        """Identity ``alice`` with an API key and a connection to ``fake`` whose access token
        expires ``expires_in`` seconds from now (negative: already expired)."""
        store = await self.store()
        try:
            self.alice, self.api_key = await IdentityService(store, self.box).add_identity(
                "alice", None)
            body = self.auth.issue_tokens("alice")
            tokens = TokenFields(body["access_token"], body["refresh_token"],
                                 expires_at=time.time() + expires_in)
            await store.put_connection(self.alice.id, "fake", tokens, None, time.time())
            return tokens
        finally:
            await store.close()

    async def connection(self) -> Connection:
        assert self.alice is not None
        store = await self.store()
        try:
            conn = await store.get_connection(self.alice.id, "fake")
        finally:
            await store.close()
        assert conn is not None
        return conn

    # -- processes ------------------------------------------------------------------

    async def start(self, n: int) -> list[Instance]:
        """Start ``n`` gateways together; return once every one answers its health check."""
        env = {k: v for k, v in os.environ.items()
               if not k.startswith(("GATEWAY_", "PROMETHEUS_"))}
        env.update(PYTHONPATH=str(REPO), GATEWAY_LOG_LEVEL="WARNING")
        started = []
        for _ in range(n):
            i = len(self.instances)
            port = self.ports()
            log = self.tmp / f"gw{i}.log"
            with log.open("wb") as sink:
                proc = await asyncio.create_subprocess_exec(
                    sys.executable, "-m", "gateway", "serve", "--config", str(self.config.source),
                    "--port", str(port), "--pidfile", str(self.tmp / f"gw{i}.pid"),
                    stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL,
                    stderr=sink, env=env, cwd=str(self.tmp))
            inst = Instance(f"gw{i}", proc, port, log)
            self.instances.append(inst)
            started.append(inst)
        await asyncio.gather(*(self._healthy(inst) for inst in started))
        return started

    async def _healthy(self, inst: Instance) -> None:
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            if inst.proc.returncode is not None:
                pytest.fail(f"{inst.name} exited with {inst.proc.returncode}:\n{inst.log_tail()}")
            try:
                async with self.http.get(inst.url / "_gateway/healthz") as resp:
                    if resp.status == 200:
                        return
            except aiohttp.ClientError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"{inst.name} did not become healthy:\n{inst.log_tail()}")
            await asyncio.sleep(POLL)

    async def kill(self, inst: Instance) -> None:
        """SIGKILL: no cleanup of any kind runs in the process."""
        inst.proc.send_signal(signal.SIGKILL)
        assert await inst.proc.wait() == -signal.SIGKILL

    async def stop_all(self) -> None:
        running = [i for i in self.instances if i.proc.returncode is None]
        for inst in running:
            inst.proc.terminate()
        for inst in running:
            try:
                await asyncio.wait_for(inst.proc.wait(), STOP_TIMEOUT)
            except TimeoutError:
                inst.proc.kill()
                await inst.proc.wait()

    # -- traffic --------------------------------------------------------------------

    async def call(self, inst: Instance, tag: str = "") -> tuple[int, Any]:
        """A proxied request as alice: (status, JSON body)."""
        async with self.http.get(inst.url / "fake" / "protected", params={"tag": tag},
                                 headers={"Authorization": f"Bearer {self.api_key}"}) as resp:
            body = await resp.json(content_type=None)
            return resp.status, body

    async def in_flight(self, inst: Instance) -> float:
        """Requests the gateway is handling right now, not counting this scrape."""
        async with self.http.get(inst.url / "_gateway/metrics") as resp:
            text = await resp.text()
        for line in text.splitlines():
            if line.startswith("gateway_requests_in_flight "):
                return float(line.split()[1]) - 1
        pytest.fail(f"{inst.name} reports no gateway_requests_in_flight metric")

    async def wait_in_flight(self, inst: Instance, n: int) -> None:
        """Until ``inst`` holds at least ``n`` requests (they all wait on the refresh)."""
        deadline = time.monotonic() + START_TIMEOUT
        while (have := await self.in_flight(inst)) < n:
            if time.monotonic() > deadline:
                pytest.fail(f"{inst.name} holds {have} requests, never {n}:\n{inst.log_tail()}")
            await asyncio.sleep(POLL)


def _store_url_for(kind: str, tmp: Path, pg_url: str | None) -> str:
    return f"sqlite:///{tmp / 'shared.db'}" if kind == "sqlite" else str(pg_url)


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
async def make_cluster(request: pytest.FixtureRequest, tmp_path: Path,
                       aiohttp_server: Callable[..., Any],
                       unused_tcp_port_factory: Callable[[], int],
                       write_config: Callable[..., Config],
                       encryption_key: str) -> AsyncIterator[Callable[..., Any]]:
    """``await make_cluster([auth], **auth_knobs)``: fakes started, config written, nothing
    seeded."""
    async with AsyncExitStack() as stack:
        pg_url = None
        if request.param == "postgres":
            pg_url = (await stack.enter_async_context(pg_schema())).holder_spec["url"]
        http = await stack.enter_async_context(
            aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0),
                                  timeout=aiohttp.ClientTimeout(total=45)))
        clusters: list[Cluster] = []

        async def make(auth: FakeAuthServer | None = None, **auth_knobs: Any) -> Cluster:
            auth = await start_auth_server(aiohttp_server, auth, **auth_knobs)
            upstream = LiveUpstream()
            upstream.auth = auth
            upstream.server = await aiohttp_server(upstream.app())
            public = f"http://127.0.0.1:{unused_tcp_port_factory()}"  # the load balancer's
            cfg = write_config({
                "server": {"host": "127.0.0.1", "port": 8080, "public_url": public,
                           "shutdown_grace": 2},
                "store": {"url": _store_url_for(request.param, tmp_path, pg_url)},
                "providers": {"fake": auth.config_entry(upstream=str(upstream.url / "api"))},
            })
            cluster = Cluster(request.param, auth, upstream, cfg, cfg.store.url,
                              SecretBox(decode_key(encryption_key)), http, tmp_path,
                              unused_tcp_port_factory)
            clusters.append(cluster)
            return cluster

        try:
            yield make
        finally:
            for cluster in clusters:
                await cluster.stop_all()
