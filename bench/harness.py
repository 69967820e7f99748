"""Process plumbing for the benchmarks: ports, CPU layout, child processes, nginx configs.

Every server the suite starts is a child in its own session (process group), so stopping
it stops its workers too, and nothing else: the suite only ever signals groups it created.
Only loopback addresses are used.

CPU layout. On a small machine the load generator competes with the servers. For an
N-worker measurement the servers get the first N CPUs and the load generator (wrk) plus the
origin get the rest; when there are not more CPUs than workers, everything shares every
CPU. :func:`layout` computes that; :func:`pin` applies it to running processes.
"""

from __future__ import annotations

import contextlib
import http.client
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PYTHON = sys.executable
LOOPBACK = "127.0.0.1"


class BenchError(RuntimeError):
    """A benchmark step could not run (a server did not start, a tool is missing)."""


# --------------------------------------------------------------------------- CPUs


@dataclass(frozen=True, slots=True)
class Layout:
    """Which CPUs the servers under test and the load side (wrk, origin) may use."""

    server: tuple[int, ...]
    load: tuple[int, ...]

    @property
    def pinned(self) -> bool:
        return self.server != self.load

    def describe(self) -> str:
        if not self.pinned:
            return f"unpinned (all share CPUs {_cpus(self.server)})"
        return f"server on CPU {_cpus(self.server)}, wrk + origin on CPU {_cpus(self.load)}"


def _cpus(cpus: Sequence[int]) -> str:
    return ",".join(str(c) for c in cpus)


def available_cpus() -> tuple[int, ...]:
    return tuple(sorted(os.sched_getaffinity(0)))


def layout(workers: int, cpus: Sequence[int] | None = None) -> Layout:
    """Servers on the first ``workers`` CPUs, load on the rest, if there is a rest."""
    cpus = tuple(cpus if cpus is not None else available_cpus())
    if len(cpus) > workers:
        return Layout(cpus[:workers], cpus[workers:])
    return Layout(cpus, cpus)


def taskset(cmd: Sequence[str], cpus: Sequence[int] | None) -> list[str]:
    """``cmd`` started on ``cpus`` (children inherit the affinity)."""
    if not cpus or set(cpus) == set(available_cpus()) or shutil.which("taskset") is None:
        return list(cmd)
    return ["taskset", "-c", _cpus(cpus), *cmd]


def descendants(pid: int) -> list[int]:
    """``pid`` and every process below it (Linux /proc)."""
    found, todo = [], [pid]
    while todo:
        p = todo.pop()
        found.append(p)
        with contextlib.suppress(OSError):
            for task in Path(f"/proc/{p}/task").iterdir():
                with contextlib.suppress(OSError):
                    todo.extend(int(c) for c in (task / "children").read_text().split())
    return found


def pin(pid: int, cpus: Sequence[int]) -> None:
    """Move a running process tree (every thread) onto ``cpus``."""
    for p in descendants(pid):
        with contextlib.suppress(OSError):
            for task in Path(f"/proc/{p}/task").iterdir():
                with contextlib.suppress(OSError):
                    os.sched_setaffinity(int(task.name), set(cpus))


# --------------------------------------------------------------------------- processes


def raise_fd_limit() -> int:
    """Lift our soft open-files limit to the hard one (children inherit it): the storm holds
    a thousand client and upstream connections in one gateway process."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard > soft:
        target = 65536 if hard == resource.RLIM_INFINITY else hard
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def free_port() -> int:
    with socket.socket() as s:
        s.bind((LOOPBACK, 0))
        return int(s.getsockname()[1])


class Server:
    """A child process in its own session; its output goes to ``log``."""

    def __init__(self, name: str, cmd: Sequence[str], log: Path, *,
                 env: Mapping[str, str] | None = None, cwd: Path | None = None) -> None:
        self.name, self.cmd, self.log = name, list(cmd), log
        self.started_at = time.perf_counter()
        with open(log, "ab") as out:
            self.proc = subprocess.Popen(
                self.cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                env={**os.environ, **(env or {})}, cwd=cwd or ROOT, start_new_session=True)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def check(self) -> None:
        if not self.alive():
            raise BenchError(f"{self.name} exited with code {self.proc.returncode}; "
                             f"its output:\n{tail(self.log)}")

    def stop(self, timeout: float = 15.0) -> None:
        """SIGTERM to the process group we created; SIGKILL to it if it lingers."""
        if self.alive():
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        # Workers of a supervisor that died first are still in our group.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)


def tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no output)"


@contextlib.contextmanager
def running(*servers: Server) -> Iterator[None]:
    try:
        yield
    finally:
        for s in reversed(servers):
            s.stop()


# --------------------------------------------------------------------------- HTTP probes


def get(port: int, path: str, headers: Mapping[str, str] | None = None,
        timeout: float = 5.0) -> tuple[int, bytes]:
    """One GET on a new connection: (status, body); raises OSError when nothing listens."""
    conn = http.client.HTTPConnection(LOOPBACK, port, timeout=timeout)
    try:
        conn.request("GET", path, headers=dict(headers or {}))
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def wait_http(server: Server, port: int, path: str, *, headers: Mapping[str, str] | None = None,
              timeout: float = 30.0, interval: float = 0.002) -> float:
    """Poll until ``path`` answers 200; seconds since the server was spawned."""
    deadline = time.perf_counter() + timeout
    last = "nothing listening"
    while time.perf_counter() < deadline:
        server.check()
        try:
            status, body = get(port, path, headers)
            if status == 200:
                return time.perf_counter() - server.started_at
            last = f"HTTP {status}: {body[:200]!r}"
        except (OSError, http.client.HTTPException) as e:
            last = type(e).__name__
        time.sleep(interval)
    raise BenchError(f"{server.name} did not answer 200 on {path} within {timeout:g}s "
                     f"(last: {last}); its output:\n{tail(server.log)}")


def wait_workers(server: Server, port: int, path: str, workers: int, *,
                 timeout: float = 30.0) -> None:
    """Poll ``path`` (which answers JSON with a ``pid``) until ``workers`` distinct pids
    answered: with SO_REUSEPORT each new connection may land on any worker."""
    import json

    seen: set[int] = set()
    deadline = time.perf_counter() + timeout
    while len(seen) < workers:
        if time.perf_counter() > deadline:
            raise BenchError(f"{server.name}: only {len(seen)} of {workers} workers answered")
        server.check()
        try:
            status, body = get(port, path)
            if status == 200:
                seen.add(int(json.loads(body)["pid"]))
                continue
        except (OSError, http.client.HTTPException, ValueError, KeyError):
            pass
        time.sleep(0.01)


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise BenchError(f"no VmRSS for process {pid}")


# --------------------------------------------------------------------------- nginx


def nginx_binary() -> str:
    found = shutil.which("nginx") or next(
        (p for p in ("/usr/sbin/nginx", "/usr/local/sbin/nginx") if os.access(p, os.X_OK)), None)
    if found is None:
        raise BenchError("nginx not found: apt-get install nginx (see docs/benchmarks.md)")
    return found


SMALL_BODY = '{"ok":true,"service":"bench-origin"}\\n'


def _nginx_main(workdir: Path, workers: int, http_block: str) -> str:
    # As root the workers would switch to "nobody", who cannot use our private temp dir.
    user = "user root;\n" if os.geteuid() == 0 else ""
    return f"""{user}worker_processes {workers};
daemon off;
pid {workdir}/nginx.pid;
error_log {workdir}/error.log warn;
worker_rlimit_nofile 16384;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    client_body_temp_path {workdir}/body;
    proxy_temp_path {workdir}/proxy;
    fastcgi_temp_path {workdir}/fastcgi;
    uwsgi_temp_path {workdir}/uwsgi;
    scgi_temp_path {workdir}/scgi;
    keepalive_requests 1000000;
    keepalive_timeout 75s;
{http_block}}}
"""


def origin_conf(workdir: Path, port: int) -> str:
    """The origin: a small JSON answer to any method; a POST body is read and discarded."""
    return _nginx_main(workdir, 1, f"""    server {{
        listen {LOOPBACK}:{port} backlog=4096;
        client_max_body_size 0;
        location / {{
            default_type application/json;
            return 200 '{SMALL_BODY}';
        }}
    }}
""")


def proxy_conf(workdir: Path, port: int, origin_port: int, workers: int) -> str:
    """nginx as the fastest possible token injector: proxy_pass with a static header."""
    return _nginx_main(workdir, workers, f"""    upstream origin {{
        server {LOOPBACK}:{origin_port};
        keepalive 256;
        keepalive_requests 1000000;
    }}
    server {{
        listen {LOOPBACK}:{port} backlog=4096;
        client_max_body_size 0;
        location / {{
            proxy_pass http://origin;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header Authorization "Bearer static-benchmark-token";
        }}
    }}
""")


def start_nginx(name: str, workdir: Path, conf: str, cpus: Sequence[int] | None) -> Server:
    workdir.mkdir(parents=True, exist_ok=True)
    path = workdir / "nginx.conf"
    path.write_text(conf)
    cmd = [nginx_binary(), "-p", str(workdir), "-c", str(path), "-e", str(workdir / "error.log")]
    return Server(name, taskset(cmd, cpus), workdir / "stdout.log")


def python_server(name: str, script: str, args: Sequence[str], log: Path,
                  cpus: Sequence[int] | None, env: Mapping[str, str] | None = None) -> Server:
    return Server(name, taskset([PYTHON, str(ROOT / "bench" / script), *args], cpus), log,
                  env=env)


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds used so far by ``pid`` and the processes below it."""
    ticks = os.sysconf("SC_CLK_TCK")
    total = 0
    for p in descendants(pid):
        with contextlib.suppress(OSError, IndexError, ValueError):
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])  # utime, stime
    return total / ticks


def machine_busy_seconds() -> float:
    """CPU seconds all CPUs have spent busy since boot (``/proc/stat``)."""
    fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(x) for x in fields[:8])
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


class CpuWatch:
    """The CPU our processes used during a measurement, and what *other* processes on the
    machine used meanwhile (``foreign``, in cores): a run with much foreign CPU competed
    with someone else's work and is marked as disturbed."""

    def __init__(self, servers: Sequence[Server]) -> None:
        self._pids = sorted({s.pid for s in servers})

    def _ours(self) -> float:
        import resource

        me = resource.getrusage(resource.RUSAGE_SELF)
        kids = resource.getrusage(resource.RUSAGE_CHILDREN)  # reaped ones: wrk, probes
        return (sum(cpu_seconds(p) for p in self._pids) + me.ru_utime + me.ru_stime
                + kids.ru_utime + kids.ru_stime)

    def __enter__(self) -> CpuWatch:
        self._t0, self._busy0, self._ours0 = time.monotonic(), machine_busy_seconds(), self._ours()
        self.foreign = 0.0
        return self

    def __exit__(self, *exc: object) -> None:
        wall = max(time.monotonic() - self._t0, 1e-6)
        busy = machine_busy_seconds() - self._busy0
        self.foreign = max(0.0, (busy - (self._ours() - self._ours0)) / wall)
