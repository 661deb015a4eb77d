"""Soak: sustained load on the real service, with model reloads, watching errors and memory.

Starts ``ranker serve`` in its own process on a free loopback port (the artifact ``--artifact``,
default ``artifacts/default``; when there is none, a small world is generated and a small model
trained into a temporary directory first), then drives ``--concurrency`` client threads, each on
its own keep-alive ``http.client`` connection, for ``--duration`` seconds (at most
``--max-requests`` requests). Each request ranks ``--candidates`` random videos for a random user
with a random context. With ``--reloads N`` the artifact is copied under a temporary root and N
new versions are published and loaded through ``POST /admin/reload`` during the run, evenly
spaced, so memory is watched across model swaps too.

Reports requests, errors (anything but a 200 naming its ``model_version``), latency p50 / p90 /
p99 / max, and the service's RSS (``VmRSS`` of ``/proc/PID/status``) when ready, after the
warm-up (``--warmup`` seconds of load) and at the end. Exits 1 when any request failed or when RSS
grew from the warm-up to the end by more than ``--rss-growth-mib`` MiB or ``--rss-growth-pct``
percent, whichever bound is smaller (first requests allocate arenas and buffers once: that is
the warm-up's, not a leak).

    .venv/bin/python bench/soak.py                         # 60 s at concurrency 8
    .venv/bin/python bench/soak.py --reloads 6             # the same, swapping models meanwhile
    .venv/bin/python bench/soak.py --duration 10 --json runs/soak.json
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from service.launch import free_port, wait_until_ready  # noqa: E402

TOKEN = "soak-admin-token"  # loopback only, this run's own service


def rss_mib(pid: int) -> float:
    """Resident set size of ``pid`` from ``/proc/PID/status`` (kB there), in MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for process {pid}")


def small_artifact(tmp: Path) -> Path:
    """A small world and a small model (about a minute on 2 cores) when no artifact exists."""
    world, run = tmp / "world", tmp / "run"
    print(f"no artifact: generating a small world and training a small model in {tmp}", flush=True)
    ranker = [sys.executable, "-m", "ranker"]
    subprocess.run(
        [*ranker, "generate", "--out", str(world), "--quiet"]
        + ["--n-users", "2000", "--n-videos", "1500", "--n-requests", "4000"],
        cwd=ROOT,
        check=True,
    )
    sets = [
        f'data.log="{world / "log"}"',
        f'data.users="{world / "users.parquet"}"',
        f'data.videos="{world / "videos.parquet"}"',
        "training.epochs=1",
        f'training.run_dir="{run}"',
        f'export.artifact_root="{tmp / "artifacts"}"',
    ]
    cmd = [*ranker, "train", "--config", "configs/default.toml", "--quiet"]
    subprocess.run([*cmd, *(a for s in sets for a in ("--set", s))], cwd=ROOT, check=True)
    return tmp / "artifacts" / "default"


def publish(root: Path, src: Path, name: str) -> None:
    """A copy of version ``src`` renamed ``name`` (its manifest too), moved in with one rename."""
    tmp = root / f".tmp-{name}"
    shutil.copytree(src, tmp)
    manifest = json.loads((tmp / "manifest.json").read_text())
    manifest["version"] = name
    (tmp / "manifest.json").write_text(json.dumps(manifest))
    os.rename(tmp, root / name)


def request_bodies(artifact: Path, n: int, candidates: int, seed: int = 0) -> list[bytes]:
    """``n`` encoded rank requests over the artifact's users and videos tables."""
    from ranker.artifact import load_artifact

    d = load_artifact(artifact).config.data
    users = pq.read_table(ROOT / d.users, columns=[d.user_key])[d.user_key].to_numpy()
    videos = pq.read_table(ROOT / d.videos, columns=[d.video_key])[d.video_key].to_numpy()
    rng = np.random.default_rng(seed)
    k = min(candidates, len(videos))
    return [
        json.dumps(
            {
                "user_id": int(rng.choice(users)),
                "context": {
                    "device": str(rng.choice(["ios", "android", "web", "tv"])),
                    "hour": int(rng.integers(0, 24)),
                },
                "candidates": [{"video_id": int(v)} for v in rng.choice(videos, k, replace=False)],
            }
        ).encode()
        for _ in range(n)
    ]


class Load:
    """Client threads on keep-alive connections; latencies and failures of every request."""

    def __init__(self, port: int, bodies: list[bytes], max_requests: int) -> None:
        self.port, self.bodies, self.max_requests = port, bodies, max_requests
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.latencies: list[float] = []  # seconds, in completion order
        self.errors: list[str] = []
        self.versions: dict[str, int] = {}

    def _connect(self) -> http.client.HTTPConnection:
        return http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)

    def run(self, worker: int) -> None:
        conn = self._connect()
        headers = {"Content-Type": "application/json"}
        i = worker
        while not self.stop.is_set():
            body = self.bodies[i % len(self.bodies)]
            i += 7
            t0 = time.perf_counter()
            try:
                conn.request("POST", "/v1/rank", body, headers)
                response = conn.getresponse()
                data = response.read()
                status = response.status
            except (OSError, http.client.HTTPException) as e:
                with self.lock:
                    self.errors.append(f"{type(e).__name__}: {e}")
                conn.close()
                conn = self._connect()
                continue
            elapsed = time.perf_counter() - t0
            # the version that scored it, without parsing the whole body on the client's core
            at = data.find(b'"model_version":"')
            version = data[at + 17 : data.find(b'"', at + 17)].decode() if at >= 0 else None
            with self.lock:
                if status != 200 or version is None:
                    self.errors.append(f"{status}: {data[:200]!r}")
                else:
                    self.latencies.append(elapsed)
                    self.versions[version] = self.versions.get(version, 0) + 1
                if len(self.latencies) + len(self.errors) >= self.max_requests:
                    self.stop.set()
        conn.close()


def admin_reload(port: int) -> tuple[int, dict]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    conn.request("POST", "/admin/reload", b"", {"Authorization": f"Bearer {TOKEN}"})
    r = conn.getresponse()
    out = r.status, json.loads(r.read())
    conn.close()
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--artifact", default="artifacts/default", help="version dir or its parent")
    p.add_argument("--duration", type=float, default=60.0, help="seconds of load after warm-up")
    p.add_argument("--warmup", type=float, default=5.0, help="seconds of load before measuring")
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--candidates", type=int, default=300, help="candidates per request")
    p.add_argument("--max-requests", type=int, default=1_000_000)
    p.add_argument("--reloads", type=int, default=0, help="model versions swapped in meanwhile")
    p.add_argument("--threads", type=int, default=1, help="the service's torch threads")
    p.add_argument("--rss-growth-mib", type=float, default=100.0)
    p.add_argument("--rss-growth-pct", type=float, default=20.0)
    p.add_argument("--json", help="write the figures here too")
    a = p.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="ranker-soak-"))
    proc: subprocess.Popen | None = None
    try:
        from ranker.artifact import resolve
        from ranker.errors import ArtifactError

        try:
            source = resolve(ROOT / a.artifact)
        except ArtifactError:
            source = resolve(small_artifact(tmp))
        root = tmp / "root"
        root.mkdir()
        publish(root, source, "20000101T000000-soak00")  # names sort after one another
        bodies = request_bodies(source, 256, a.candidates)

        port = free_port()
        env = os.environ | {
            "RANKER_ARTIFACT": str(root),
            "RANKER_THREADS": str(a.threads),
            "RANKER_ADMIN_TOKEN": TOKEN,
            "RANKER_LOG_LEVEL": "warning",  # the request log is not what is measured
        }
        log = open(tmp / "service.log", "w")  # noqa: SIM115 - the service's lifetime
        cmd = [sys.executable, "-m", "ranker", "serve", "--host", "127.0.0.1", "--port", str(port)]
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
        wait_until_ready(f"http://127.0.0.1:{port}", proc, 120.0, tmp / "service.log")
        rss_ready = rss_mib(proc.pid)

        load = Load(port, bodies, a.max_requests)
        threads = [threading.Thread(target=load.run, args=(i,)) for i in range(a.concurrency)]
        for t in threads:
            t.start()
        time.sleep(a.warmup)
        rss_warm = rss_mib(proc.pid)
        with load.lock:
            warm_n = len(load.latencies)
        t_start = time.monotonic()
        reload_at = [t_start + a.duration * (i + 1) / (a.reloads + 1) for i in range(a.reloads)]
        reload_results: list[str] = []
        peak = rss_warm
        while not load.stop.is_set() and time.monotonic() - t_start < a.duration:
            if reload_at and time.monotonic() >= reload_at[0]:
                reload_at.pop(0)
                name = f"20000101T000000-soak{len(reload_results) + 1:02d}"
                publish(root, source, name)
                status, out = admin_reload(port)
                reload_results.append(f"{name}: {status} serving {out.get('model_version')}")
            peak = max(peak, rss_mib(proc.pid))
            time.sleep(0.2)
        load.stop.set()
        for t in threads:
            t.join(timeout=60)
        elapsed = time.monotonic() - t_start
        rss_end = rss_mib(proc.pid)

        lat = np.asarray(load.latencies[warm_n:]) * 1000
        growth = rss_end - rss_warm
        bound = min(a.rss_growth_mib, rss_warm * a.rss_growth_pct / 100)
        figures = {
            "concurrency": a.concurrency,
            "candidates": a.candidates,
            "duration_s": round(elapsed, 1),
            "requests": int(len(lat)),
            "warmup_requests": warm_n,
            "errors": len(load.errors),
            "throughput_rps": round(len(lat) / elapsed, 1),
            "latency_ms": {
                q: round(float(np.percentile(lat, p)), 2) if len(lat) else None
                for q, p in (("p50", 50), ("p90", 90), ("p99", 99), ("max", 100))
            },
            "rss_mib": {
                "ready": round(rss_ready, 1),
                "after_warmup": round(rss_warm, 1),
                "peak": round(peak, 1),
                "end": round(rss_end, 1),
                "growth": round(growth, 1),
                "bound": round(bound, 1),
            },
            "reloads": reload_results,
            # other processes on the machine: latency on shared cores is only comparable at equal load
            "loadavg_1m_at_end": round(os.getloadavg()[0], 2),
            "cpus": os.cpu_count(),
            "versions_served": load.versions,
            "first_errors": load.errors[:5],
        }
        print(json.dumps(figures, indent=1))
        if a.json:
            Path(a.json).parent.mkdir(parents=True, exist_ok=True)
            Path(a.json).write_text(json.dumps(figures, indent=1))
        failed = []
        if load.errors:
            failed.append(f"{len(load.errors)} failed requests")
        if growth > bound:
            failed.append(f"RSS grew {growth:.1f} MiB after the warm-up (bound {bound:.1f} MiB)")
        if a.reloads and len(reload_results) != a.reloads:
            failed.append(f"{len(reload_results)} of {a.reloads} reloads happened")
        if any(": 200 " not in r for r in reload_results):
            failed.append("a reload was refused")
        if failed:
            print("FAIL: " + "; ".join(failed))
            return 1
        print("OK: no failed request, RSS within its bound")
        return 0
    finally:
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
