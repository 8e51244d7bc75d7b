"""Serving throughput of the data service next to nginx, on the same 1 GB shards, over loopback.

Builds a shard root with a few 1 GB shards published in a manifest (random bytes, exact sizes
and sha256), then starts side by side in the same run (see ``candidates`` in :func:`main`):

- ``nginx``: Debian's nginx serving the shard folder as static files (``sendfile on``, access
  log off) -- the reference;
- ``app 1w pread`` / ``app 2w pread``: ``multiface serve`` with ``MULTIFACE_ZERO_COPY=0``
  (1 MiB ``os.pread`` in a thread, then ASGI send), 1 and 2 uvicorn workers;
- ``app 1w sendfile`` / ``app 2w sendfile``: the default, ``os.sendfile`` (in worker threads)
  through the ASGI zero-copy send extension (``services.server.ZeroCopyProtocol``);
- ``nginx+app accel``: nginx in front of the app run with ``MULTIFACE_ACCEL_REDIRECT_PREFIX``:
  the app checks each request and answers ``X-Accel-Redirect``, nginx sends the bytes.

For each concurrency (1, 8, 32 clients) the servers take turns (round-robin, so load from other
work on the machine hits them alike). Each client is a loop of ``curl -s -o /dev/null`` processes
downloading random whole shards until the window ends; the bytes every ``curl`` received
(partial downloads included, via ``--max-time``) over the window give the aggregate MB/s
(MB = 10^6 bytes). Meanwhile another process polls the status endpoint (``/api/v1/summary``;
for nginx a small static file, as a reference for what the loaded machine itself adds) on a new
connection every 50 ms, and the server's process tree is sampled from ``/proc`` (RSS, CPU).
Then 100 slow readers (64 KiB receive buffer, 4 KiB/s each) hold downloads open while the
status endpoint is polled and one normal download runs; the server's RSS is sampled again.

Results (Markdown, with the machine, versions, command and load average) go to
``bench/results_serve.md`` and stdout. Needs ``curl`` and ``nginx`` (``apt-get install -y curl
nginx-light``). About 8 minutes on 2 cores with the defaults (``--servers`` picks a subset).

Run::

    .venv/bin/python bench/bench_serve.py                          # temp dir, removed afterwards
    .venv/bin/python bench/bench_serve.py --work-dir /tmp/serve    # keep and reuse the shards
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import http.client
import multiprocessing
import os
import platform
import random
import resource
import shutil
import signal
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from shards.manifest import Manifest, ShardEntry, load_manifest, save_manifest

ENTITY = "m--20180227--0000--6795937--GHS"
BLOCK_BYTES = 64 << 20
STATUS_PATH = "/api/v1/summary"
SLOW_RECEIVE_BUFFER = 64 << 10
SLOW_READ_BYTES = 1024
SLOW_READ_INTERVAL = 0.25
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
PAGE_BYTES = os.sysconf("SC_PAGE_SIZE")


# Shards ---------------------------------------------------------------------------------------
def build_shard_root(shard_root: Path, num_files: int, file_bytes: int) -> list[ShardEntry]:
    """Publish ``num_files`` shards of ``file_bytes`` random bytes; reuse them when already there."""
    folder = shard_root / ENTITY
    try:
        manifest = load_manifest(folder)
        if len(manifest.shards) == num_files and all(
            shard.bytes == file_bytes and (folder / shard.name).stat().st_size == file_bytes
            for shard in manifest.shards
        ):
            print(f"reusing {num_files} shards in {folder}", flush=True)
            return manifest.shards
    except (OSError, ValueError):
        pass
    (folder / "shards").mkdir(parents=True, exist_ok=True)
    block = bytearray(os.urandom(BLOCK_BYTES))
    shards = []
    started = time.perf_counter()
    for index in range(num_files):
        name = f"shards/E001-{index:06d}.tar"
        digest = hashlib.sha256()
        with open(folder / name, "wb") as handle:
            for start in range(0, file_bytes, BLOCK_BYTES):
                # A distinct header per block and file, so no two blocks or files are identical.
                block[:16] = struct.pack("<QQ", index, start)
                piece = memoryview(block)[: min(BLOCK_BYTES, file_bytes - start)]
                handle.write(piece)
                digest.update(piece)
        shards.append(ShardEntry(name, file_bytes, digest.hexdigest(), num_samples=1, expressions=["E001"]))
    save_manifest(
        folder,
        Manifest(
            entity=ENTITY,
            entity_id=ENTITY.split("--")[2],
            state="complete",
            shard_size=file_bytes,
            num_planned_shards=num_files,
            expressions=["E001"],
            shards=shards,
        ),
    )
    print(
        f"wrote {num_files} x {file_bytes / 1e9:.2f} GB in {time.perf_counter() - started:.1f} s", flush=True
    )
    return shards


def warm_page_cache(paths: list[Path]) -> None:
    for path in paths:
        with open(path, "rb", buffering=0) as handle:
            while handle.read(64 << 20):
                pass


# Process trees from /proc ---------------------------------------------------------------------
def process_tree(root_pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as handle:
                fields = handle.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(entry))
    tree, pending = [], [root_pid]
    while pending:
        pid = pending.pop()
        tree.append(pid)
        pending.extend(children.get(pid, []))
    return tree


def tree_rss_bytes(root_pids: list[int]) -> int:
    total = 0
    for pid in (pid for root in root_pids for pid in process_tree(root)):
        try:
            with open(f"/proc/{pid}/statm") as handle:
                total += int(handle.read().split()[1]) * PAGE_BYTES
        except OSError:
            pass
    return total


def tree_cpu_seconds(root_pids: list[int]) -> float:
    total = 0
    for pid in (pid for root in root_pids for pid in process_tree(root)):
        try:
            with open(f"/proc/{pid}/stat") as handle:
                fields = handle.read().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])  # utime, stime
        except OSError:
            pass
    return total / CLOCK_TICKS


def machine_busy_seconds() -> float:
    """CPU seconds spent not idle by all cores since boot (user+nice+system+irq+softirq+steal)."""
    with open("/proc/stat") as handle:
        values = [int(value) for value in handle.readline().split()[1:]]
    user, nice, system, idle, iowait, irq, softirq, steal = values[:8]
    return (user + nice + system + irq + softirq + steal) / CLOCK_TICKS


def children_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


class TreeSampler:
    """Samples the RSS of process trees every ``interval`` seconds in a thread; keeps the peak."""

    def __init__(self, root_pids: list[int], interval: float = 0.25):
        self.root_pid = root_pids
        self.interval = interval
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> TreeSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, tree_rss_bytes(self.root_pid))

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.peak = max(self.peak, tree_rss_bytes(self.root_pid))


# Servers --------------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def wait_for(url_host: str, port: int, path: str, process: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + 30
    while True:
        try:
            connection = http.client.HTTPConnection(url_host, port, timeout=2)
            connection.request("GET", path)
            if connection.getresponse().status == 200:
                connection.close()
                return
        except OSError:
            pass
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            process.wait(5)
            raise RuntimeError(f"server did not start; see {log}:\n{log.read_text()[-3000:]}")
        time.sleep(0.1)


@dataclass
class Server:
    name: str
    port: int
    file_prefix: str
    """URL path before a manifest name, e.g. ``/api/v1/entities/<entity>/``."""
    status_path: str
    processes: list[subprocess.Popen]
    notes: str = ""
    checks_etag: bool = True

    @property
    def pids(self) -> list[int]:
        return [process.pid for process in self.processes]

    def url(self, name: str) -> str:
        return f"http://127.0.0.1:{self.port}{self.file_prefix}{name}"

    def stop(self) -> None:
        for process in self.processes:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for process in self.processes:
            try:
                process.wait(15)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(5)


NGINX_CONFIG = """
{user}
worker_processes {workers};
daemon off;
pid {work}/nginx.pid;
error_log {work}/nginx-error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    sendfile on;
    tcp_nopush on;
    keepalive_timeout 5s;
    default_type application/octet-stream;
    client_body_temp_path {work}/nginx-body;
    proxy_temp_path {work}/nginx-proxy;
    fastcgi_temp_path {work}/nginx-fastcgi;
    uwsgi_temp_path {work}/nginx-uwsgi;
    scgi_temp_path {work}/nginx-scgi;
    server {{
        listen 127.0.0.1:{port};
        location /files/ {{ alias {shard_root}/; }}
        {extra}
    }}
}}
"""


def start_nginx(
    name: str, work: Path, shard_root: Path, extra: str = ""
) -> tuple[int, subprocess.Popen, Path]:
    """nginx on a free loopback port serving ``shard_root`` under ``/files/``, plus ``extra`` locations."""
    port = free_port()
    folder = work / name.replace(" ", "-")
    folder.mkdir(parents=True, exist_ok=True)
    config = folder / "nginx.conf"
    # Started as root, nginx workers would run as nobody, who may not read the work folder.
    user = "user root;" if os.geteuid() == 0 else ""
    config.write_text(
        NGINX_CONFIG.format(
            user=user, workers="auto", work=folder, port=port, shard_root=shard_root, extra=extra
        )
    )
    log = folder / "nginx-error.log"
    process = subprocess.Popen(
        [nginx_binary(), "-p", str(folder), "-c", str(config), "-e", str(log)],
        stdout=subprocess.DEVNULL,
        stderr=open(folder / "nginx-stderr.log", "wb"),
    )
    return port, process, folder / "nginx-stderr.log"


def start_static(work: Path, shard_root: Path) -> Server:
    port, process, log = start_nginx("nginx", work, shard_root)
    wait_for("127.0.0.1", port, f"/files/{ENTITY}/manifest.json", process, log)
    return Server(
        "nginx", port, f"/files/{ENTITY}/", f"/files/{ENTITY}/manifest.json", [process], checks_etag=False
    )


def start_accel(name: str, work: Path, data_root: Path, shard_root: Path) -> Server:
    """The app (1 worker) behind nginx: the app checks and answers X-Accel-Redirect, nginx sends the bytes."""
    from services.files import NGINX_INTERNAL_LOCATION

    app = start_app(
        f"{name} app", work, data_root, shard_root, 1, {"MULTIFACE_ACCEL_REDIRECT_PREFIX": "/internal/"}
    )
    extra = NGINX_INTERNAL_LOCATION.format(prefix="/internal/", shard_root=shard_root) + (
        f"location / {{ proxy_pass http://127.0.0.1:{app.port}; proxy_http_version 1.1; "
        'proxy_set_header Connection ""; }'
    )
    try:
        port, process, log = start_nginx(name, work, shard_root, extra)
        wait_for("127.0.0.1", port, "/api/v1/health", process, log)
    except BaseException:
        app.stop()
        raise
    return Server(name, port, app.file_prefix, STATUS_PATH, app.processes + [process])


def start_app(
    name: str, work: Path, data_root: Path, shard_root: Path, workers: int, env: dict[str, str]
) -> Server:
    port = free_port()
    log = work / f"{name.replace(' ', '-')}.log"
    environment = {key: value for key, value in os.environ.items() if not key.startswith("MULTIFACE_")}
    environment.update(env)
    process = subprocess.Popen(
        [
            str(Path(sys.executable).parent / "multiface"),
            "serve",
            "--data-root",
            str(data_root),
            "--shard-root",
            str(shard_root),
            "--port",
            str(port),
            "--workers",
            str(workers),
        ],
        stdout=open(log, "wb"),
        stderr=subprocess.STDOUT,
        env=environment,
    )
    wait_for("127.0.0.1", port, "/api/v1/health", process, log)
    return Server(name, port, f"/api/v1/entities/{ENTITY}/", STATUS_PATH, [process])


def nginx_binary() -> str:
    found = shutil.which("nginx") or ("/usr/sbin/nginx" if Path("/usr/sbin/nginx").exists() else None)
    if found is None:
        sys.exit("bench_serve: nginx is missing; apt-get install -y nginx-light")
    return found


def check_download(server: Server, shard: ShardEntry) -> None:
    """One whole shard through ``server``: status, size, sha256 and (for the app) the ETag."""
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    connection.request("GET", server.url(shard.name).split(str(server.port), 1)[1])
    response = connection.getresponse()
    digest, size = hashlib.sha256(), 0
    while chunk := response.read(1 << 20):
        digest.update(chunk)
        size += len(chunk)
    connection.close()
    problems = []
    if response.status != 200:
        problems.append(f"status {response.status}")
    if size != shard.bytes or digest.hexdigest() != shard.sha256:
        problems.append(f"{size} bytes, sha256 {digest.hexdigest()[:12]} (manifest {shard.sha256[:12]})")
    if server.checks_etag and response.getheader("ETag") != f'"{shard.sha256}"':
        problems.append(f"ETag {response.getheader('ETag')}")
    if problems:
        raise RuntimeError(f"{server.name}: {shard.name}: " + ", ".join(problems))


# Load -----------------------------------------------------------------------------------------
def poll_status(port: int, path: str, interval: float, stop, results) -> None:
    """Child process: GET ``path`` on a new connection every ``interval`` s until ``stop`` is set."""
    latencies, failures = [], 0
    while not stop.is_set():
        started = time.perf_counter()
        try:
            connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
            connection.request("GET", path)
            response = connection.getresponse()
            response.read()
            connection.close()
            if response.status != 200:
                failures += 1
            else:
                latencies.append(time.perf_counter() - started)
        except OSError:
            failures += 1
        stop.wait(max(0.0, interval - (time.perf_counter() - started)))
    results.put((latencies, failures))


class StatusPoller:
    def __init__(self, server: Server, interval: float):
        context = multiprocessing.get_context("fork")
        self._stop = context.Event()
        self._results = context.Queue()
        self._process = context.Process(
            target=poll_status, args=(server.port, server.status_path, interval, self._stop, self._results)
        )
        self.latencies: list[float] = []
        self.failures = 0

    def __enter__(self) -> StatusPoller:
        self._process.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self.latencies, self.failures = self._results.get(timeout=30)
        self._process.join(10)

    def percentile(self, fraction: float) -> float:
        if not self.latencies:
            return float("nan")
        ordered = sorted(self.latencies)
        return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


@dataclass
class Cell:
    server: str
    clients: int
    seconds: float
    bytes: int = 0
    downloads: int = 0
    errors: list[str] = field(default_factory=list)
    status_p50: float = float("nan")
    status_p99: float = float("nan")
    status_max: float = float("nan")
    status_count: int = 0
    status_failures: int = 0
    server_cpu: float = 0.0
    client_cpu: float = 0.0
    machine_busy: float = 0.0
    peak_rss: int = 0

    @property
    def mb_per_s(self) -> float:
        return self.bytes / self.seconds / 1e6


def client_loop(
    server: Server, shards: list[ShardEntry], end: float, seed: int, cell: Cell, lock: threading.Lock
) -> None:
    chooser = random.Random(seed)
    while (remaining := end - time.monotonic()) > 0.05:
        shard = chooser.choice(shards)
        run = subprocess.run(
            [
                "curl",
                "-s",
                "-o",
                "/dev/null",
                "--max-time",
                f"{remaining:.3f}",
                "-w",
                "%{http_code} %{size_download}",
                server.url(shard.name),
            ],
            capture_output=True,
            text=True,
        )
        code, _, size = run.stdout.partition(" ")
        received = int(size or 0)
        with lock:
            cell.bytes += received
            if run.returncode == 0 and code == "200" and received == shard.bytes:
                cell.downloads += 1
            elif run.returncode != 28 or code not in ("200", "000"):
                # 28 is --max-time: the window ended mid-download, expected.
                cell.errors.append(f"curl exit {run.returncode}, HTTP {code}, {received} bytes")


def run_cell(
    server: Server, shards: list[ShardEntry], clients: int, seconds: float, poll_interval: float, seed: int
) -> Cell:
    cell = Cell(server.name, clients, seconds)
    lock = threading.Lock()
    with StatusPoller(server, poll_interval) as poller, TreeSampler(server.pids) as sampler:
        time.sleep(0.3)  # a few idle polls first
        cpu_before, children_before, busy_before = (
            tree_cpu_seconds(server.pids),
            children_cpu_seconds(),
            machine_busy_seconds(),
        )
        started = time.monotonic()
        end = started + seconds
        threads = [
            threading.Thread(target=client_loop, args=(server, shards, end, seed * 1000 + index, cell, lock))
            for index in range(clients)
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        cell.seconds = time.monotonic() - started
        cell.server_cpu = tree_cpu_seconds(server.pids) - cpu_before
        cell.client_cpu = children_cpu_seconds() - children_before
        cell.machine_busy = machine_busy_seconds() - busy_before
    cell.peak_rss = sampler.peak
    cell.status_count, cell.status_failures = len(poller.latencies), poller.failures
    cell.status_p50, cell.status_p99 = poller.percentile(0.5), poller.percentile(0.99)
    cell.status_max = max(poller.latencies, default=float("nan"))
    return cell


# Slow readers -----------------------------------------------------------------------------------
async def _slow_reader(port: int, target: str, until: float, received: list[int], index: int) -> None:
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, SLOW_RECEIVE_BUFFER)
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port))
    reader, writer = await asyncio.open_connection(sock=sock, limit=SLOW_READ_BYTES * 4)
    writer.write(f"GET {target} HTTP/1.1\r\nHost: bench\r\n\r\n".encode())
    await writer.drain()
    while time.monotonic() < until:
        chunk = await reader.read(SLOW_READ_BYTES)
        if not chunk:
            break
        received[index] += len(chunk)
        await asyncio.sleep(SLOW_READ_INTERVAL)
    writer.close()


def slow_readers(port: int, targets: list[str], seconds: float, results) -> None:
    """Child process: ``len(targets)`` connections each reading about 4 KiB/s for ``seconds``."""

    async def main() -> list[int]:
        received = [0] * len(targets)
        until = time.monotonic() + seconds
        outcomes = await asyncio.gather(
            *(_slow_reader(port, target, until, received, index) for index, target in enumerate(targets)),
            return_exceptions=True,
        )
        failures = [repr(outcome) for outcome in outcomes if isinstance(outcome, BaseException)]
        return received, failures

    results.put(asyncio.run(main()))


@dataclass
class SlowCell:
    server: str
    readers: int
    rss_idle: int = 0
    peak_rss: int = 0
    bytes_read: int = 0
    reader_failures: list[str] = field(default_factory=list)
    status_p50: float = float("nan")
    status_p99: float = float("nan")
    status_failures: int = 0
    normal_mb_per_s: float = float("nan")


def run_slow(
    server: Server, shards: list[ShardEntry], readers: int, seconds: float, poll_interval: float
) -> SlowCell:
    cell = SlowCell(server.name, readers, rss_idle=tree_rss_bytes(server.pids))
    context = multiprocessing.get_context("fork")
    results = context.Queue()
    targets = [
        server.url(shards[index % len(shards)].name).split(str(server.port), 1)[1] for index in range(readers)
    ]
    process = context.Process(target=slow_readers, args=(server.port, targets, seconds, results))
    with StatusPoller(server, poll_interval) as poller, TreeSampler(server.pids) as sampler:
        process.start()
        time.sleep(min(3.0, seconds / 3))
        # One normal download while the slow readers hold their connections.
        started = time.monotonic()
        run = subprocess.run(
            [
                "curl",
                "-s",
                "-o",
                "/dev/null",
                "--max-time",
                "60",
                "-w",
                "%{http_code} %{size_download}",
                server.url(shards[0].name),
            ],
            capture_output=True,
            text=True,
        )
        code, _, size = run.stdout.partition(" ")
        if run.returncode == 0 and code == "200":
            cell.normal_mb_per_s = int(size) / (time.monotonic() - started) / 1e6
        received, cell.reader_failures = results.get(timeout=seconds + 60)
        process.join(10)
    cell.bytes_read = sum(received)
    cell.peak_rss = sampler.peak
    cell.status_p50, cell.status_p99 = poller.percentile(0.5), poller.percentile(0.99)
    cell.status_failures = poller.failures
    return cell


# Report -----------------------------------------------------------------------------------------
def versions() -> dict[str, str]:
    import fastapi
    import h11
    import starlette
    import uvicorn

    nginx = (
        subprocess.run([nginx_binary(), "-v"], capture_output=True, text=True).stderr.strip().split("/")[-1]
    )
    curl = subprocess.run(["curl", "--version"], capture_output=True, text=True).stdout.split()[1]
    try:
        import uvloop  # noqa: F401

        loop = "uvloop"
    except ImportError:
        loop = "asyncio"
    return {
        "python": platform.python_version(),
        "uvicorn": uvicorn.__version__,
        "starlette": starlette.__version__,
        "fastapi": fastapi.__version__,
        "h11": h11.__version__,
        "loop": loop,
        "nginx": nginx,
        "curl": curl,
    }


def cpu_model() -> str:
    with open("/proc/cpuinfo") as handle:
        for line in handle:
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def load_average() -> str:
    return " / ".join(f"{value:.1f}" for value in os.getloadavg())


def ms(seconds: float) -> str:
    return "-" if seconds != seconds else f"{seconds * 1000:.1f}"


def mib(size: int) -> str:
    return f"{size / (1 << 20):.0f}"


def report(
    args: argparse.Namespace,
    command: str,
    machine: dict[str, str],
    cells: list[Cell],
    slow: list[SlowCell],
    servers: list[Server],
    idle_rss: dict[str, int],
    loads: list[str],
    file_bytes: int,
) -> str:
    reference = "nginx"
    lines = [
        "## Serving throughput (`bench/bench_serve.py`)",
        "",
        f"Machine: {machine['arch']}, {machine['cores']} cores, {machine['cpu']}, kernel {machine['kernel']}, "
        f"{machine['memory']} GiB RAM. Versions: "
        + ", ".join(f"{key} {value}" for key, value in machine["versions"].items())
        + ".",
        "",
        f"Command: `{command}`",
        "",
        f"{args.num_files} shards x {file_bytes / 1e9:.2f} GB (page cache warm), loopback, clients are `curl -s -o "
        f"/dev/null` processes downloading random whole shards for {args.seconds:g} s per cell, {args.rounds} "
        f"round(s), servers taking turns. MB = 10^6 bytes; MB/s = bytes all clients received / window. Status: "
        f"`GET {STATUS_PATH}` on a new connection every {args.poll_ms} ms during the window (nginx: its small "
        "static `manifest.json`, i.e. what the loaded machine alone adds). CPU: seconds of the server's process tree, "
        "of the clients, and of the whole machine (other = busy - server - clients: other people's work on the "
        f"shared machine). Load average (1/5/15 min) before: {loads[0]}; after: {loads[-1]}.",
        "",
        "Servers: " + "; ".join(f"**{server.name}**: {server.notes}" for server in servers) + ".",
        "",
        "| server | clients | MB/s (mean) | rounds MB/s | x nginx | downloads | errors | status p50 ms | status p99 ms "
        "| status max ms | polls | server CPU % | clients CPU % | other CPU % | peak RSS MiB |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    by_key: dict[tuple[str, int], list[Cell]] = {}
    for cell in cells:
        by_key.setdefault((cell.server, cell.clients), []).append(cell)
    summary: dict[tuple[str, int], float] = {
        key: statistics.mean(cell.mb_per_s for cell in group) for key, group in by_key.items()
    }
    for clients in args.concurrency:
        for server in servers:
            group = by_key.get((server.name, clients), [])
            if not group:
                continue
            mean = summary[(server.name, clients)]
            nginx = summary.get((reference, clients))
            ratio = f"{mean / nginx:.2f}" if nginx else "-"
            latencies = [cell for cell in group if cell.status_count]
            window = sum(cell.seconds for cell in group)
            server_cpu = sum(cell.server_cpu for cell in group)
            client_cpu = sum(cell.client_cpu for cell in group)
            other = sum(cell.machine_busy for cell in group) - server_cpu - client_cpu
            lines.append(
                f"| {server.name} | {clients} | {mean:,.0f} | "
                + ", ".join(f"{cell.mb_per_s:,.0f}" for cell in group)
                + f" | {ratio} | {sum(cell.downloads for cell in group)} | {sum(len(cell.errors) for cell in group)} | "
                f"{ms(statistics.median(cell.status_p50 for cell in latencies)) if latencies else '-'} | "
                f"{ms(max(cell.status_p99 for cell in latencies)) if latencies else '-'} | "
                f"{ms(max(cell.status_max for cell in latencies)) if latencies else '-'} | "
                f"{sum(cell.status_count for cell in group)}/{sum(cell.status_failures for cell in group)} fail | "
                f"{100 * server_cpu / window:.0f} | {100 * client_cpu / window:.0f} | {100 * max(0.0, other) / window:.0f} | "
                f"{mib(max(cell.peak_rss for cell in group))} |"
            )
    lines += [
        "",
        "CPU % is of one core (200 % = both cores). status p99 is the highest per-round p99.",
        "",
        f"Memory and slow readers: RSS of the server's process tree (sum of RSS over processes) idle, peak during "
        f"the {max(args.concurrency)}-client cells, and peak while {args.slow_readers} slow readers (64 KiB receive "
        f"buffer, {SLOW_READ_BYTES * int(1 / SLOW_READ_INTERVAL) // 1024} KiB/s each) hold downloads open for "
        f"{args.slow_seconds:g} s, with the status endpoint polled and one normal download run meanwhile.",
        "",
        "| server | RSS idle MiB | peak RSS, 32 downloads MiB | peak RSS, slow readers MiB | slow bytes read | "
        "reader failures | status p50 ms | status p99 ms | status failures | normal download MB/s |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for cell in slow:
        busy = [c for c in cells if c.server == cell.server and c.clients == max(args.concurrency)]
        lines.append(
            f"| {cell.server} | {mib(idle_rss[cell.server])} | {mib(max((c.peak_rss for c in busy), default=0))} | "
            f"{mib(cell.peak_rss)} | {cell.bytes_read:,} | {len(cell.reader_failures)} | {ms(cell.status_p50)} | "
            f"{ms(cell.status_p99)} | {cell.status_failures} | {cell.normal_mb_per_s:,.0f} |"
        )
    errors = [
        f"{cell.server}, {cell.clients} clients: {error}" for cell in cells for error in cell.errors[:3]
    ]
    errors += [
        f"{cell.server}, slow readers: {failure}" for cell in slow for failure in cell.reader_failures[:3]
    ]
    if errors:
        lines += ["", "Errors (first few):", ""] + [f"- {error}" for error in errors]
    return "\n".join(lines) + "\n"


# Main -------------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--work-dir", type=Path, help="where the shards go (kept and reused); default: a temp dir, removed"
    )
    parser.add_argument("--keep", action="store_true", help="keep the temp dir with the shards")
    parser.add_argument("--num-files", type=int, default=3, help="shards to serve (default 3)")
    parser.add_argument(
        "--file-bytes", type=int, default=1_000_000_000, help="size of each shard (default 1 GB)"
    )
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32], help="clients per cell")
    parser.add_argument("--seconds", type=float, default=8.0, help="window of each cell (default 8)")
    parser.add_argument("--rounds", type=int, default=2, help="rounds over all cells (default 2)")
    parser.add_argument("--poll-ms", type=int, default=50, help="status poll interval in ms (default 50)")
    parser.add_argument("--slow-readers", type=int, default=100, help="slow readers (default 100)")
    parser.add_argument(
        "--slow-seconds", type=float, default=10.0, help="how long slow readers hold on (default 10)"
    )
    parser.add_argument("--servers", nargs="+", help="only these servers (names as in the table)")
    parser.add_argument("--out", type=Path, default=Path(__file__).with_name("results_serve.md"))
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if shutil.which("curl") is None:
        sys.exit("bench_serve: curl is missing; apt-get install -y curl")
    nginx_binary()
    command = "python bench/bench_serve.py" + (
        "" if argv is None and len(sys.argv) == 1 else " " + " ".join(sys.argv[1:])
    )
    loads = [load_average()]
    work = args.work_dir or Path(tempfile.mkdtemp(prefix="bench_serve_"))
    work.mkdir(parents=True, exist_ok=True)
    shard_root, data_root = work / "shards", work / "raw"
    data_root.mkdir(exist_ok=True)
    shard_root.mkdir(exist_ok=True)
    file_bytes = args.file_bytes
    servers: list[Server] = []
    try:
        shards = build_shard_root(shard_root, args.num_files, file_bytes)
        warm_page_cache([shard_root / ENTITY / shard.name for shard in shards])
        pread = {"MULTIFACE_ZERO_COPY": "0"}
        candidates = {
            "nginx": (
                lambda: start_static(work, shard_root),
                "Debian nginx serving the shard folder as static files, sendfile on, worker_processes auto (2)",
            ),
            "app 1w pread": (
                lambda: start_app("app 1w pread", work, data_root, shard_root, 1, pread),
                "`MULTIFACE_ZERO_COPY=0 multiface serve --workers 1`: the path before this bench "
                "(os.pread of 1 MiB in a worker thread, then ASGI send)",
            ),
            "app 2w pread": (
                lambda: start_app("app 2w pread", work, data_root, shard_root, 2, pread),
                "the same with `--workers 2`",
            ),
            "app 1w sendfile": (
                lambda: start_app("app 1w sendfile", work, data_root, shard_root, 1, {}),
                "`multiface serve --workers 1`, now the default: ASGI zero-copy send (16 MiB pieces) answered "
                "with os.sendfile in 2 worker threads while the event loop only waits for the socket",
            ),
            "app 2w sendfile": (
                lambda: start_app("app 2w sendfile", work, data_root, shard_root, 2, {}),
                "the same with `--workers 2`",
            ),
            "nginx+app accel": (
                lambda: start_accel("nginx+app accel", work, data_root, shard_root),
                "nginx in front of `MULTIFACE_ACCEL_REDIRECT_PREFIX=/internal/ multiface serve --workers 1`: "
                "the app checks the request and answers X-Accel-Redirect, nginx sends the file from "
                "`services.files.NGINX_INTERNAL_LOCATION`; status requests proxied to the app",
            ),
        }
        chosen = [name for name in candidates if not args.servers or name in args.servers]
        with ThreadPoolExecutor(len(chosen)) as pool:
            started_servers = {name: pool.submit(candidates[name][0]) for name in chosen}
            failures = []
            for name in chosen:
                try:
                    server = started_servers[name].result()
                except Exception as error:  # stop the others in ``finally``, then report
                    failures.append(f"{name}: {error}")
                    continue
                server.notes = candidates[name][1]
                servers.append(server)
        if failures:
            raise RuntimeError("servers did not start:\n" + "\n".join(failures))
        for server in servers:
            started = time.perf_counter()
            check_download(server, shards[0])
            print(
                f"{server.name}: port {server.port}, whole shard checked (sha256) in "
                f"{time.perf_counter() - started:.1f} s",
                flush=True,
            )
        idle_rss = {server.name: tree_rss_bytes(server.pids) for server in servers}
        cells: list[Cell] = []
        for round_index in range(args.rounds):
            for clients in args.concurrency:
                order = servers if round_index % 2 == 0 else list(reversed(servers))
                for server in order:
                    cell = run_cell(
                        server, shards, clients, args.seconds, args.poll_ms / 1000, round_index + 1
                    )
                    cells.append(cell)
                    print(
                        f"round {round_index + 1} {server.name:>12} {clients:>3} clients: {cell.mb_per_s:8,.0f} MB/s, "
                        f"status p50/p99 {ms(cell.status_p50)}/{ms(cell.status_p99)} ms, server CPU "
                        f"{100 * cell.server_cpu / cell.seconds:.0f} %, errors {len(cell.errors)}, load {load_average()}",
                        flush=True,
                    )
        slow = []
        for server in servers:
            cell = run_slow(server, shards, args.slow_readers, args.slow_seconds, args.poll_ms / 1000)
            slow.append(cell)
            print(
                f"slow readers {server.name}: peak RSS {mib(cell.peak_rss)} MiB, status p99 {ms(cell.status_p99)} ms, "
                f"normal download {cell.normal_mb_per_s:,.0f} MB/s",
                flush=True,
            )
        loads.append(load_average())
        machine = {
            "arch": platform.machine(),
            "cores": str(os.cpu_count()),
            "cpu": cpu_model(),
            "kernel": platform.release(),
            "memory": f"{os.sysconf('SC_PHYS_PAGES') * PAGE_BYTES / (1 << 30):.0f}",
            "versions": versions(),
        }
        text = report(args, command, machine, cells, slow, servers, idle_rss, loads, file_bytes)
        args.out.write_text(text)
        print("\n" + text)
    finally:
        for server in servers:
            server.stop()
        if args.work_dir is None and not args.keep:
            shutil.rmtree(work, ignore_errors=True)
        elif args.work_dir is None:
            print(f"kept {work}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
