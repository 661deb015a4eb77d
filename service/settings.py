"""Deployment settings, from the environment (``RANKER_...``) or keyword arguments in tests."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

from ranker.allocator import GlibcMalloc
from ranker.feature_store import DEFAULT_PREFIX

log = logging.getLogger("ranker.service")


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="RANKER_", extra="forbid")

    artifact: Path = Field(
        default=Path("artifacts/default"),
        description="an artifact version directory, or a directory whose newest version is served",
    )
    ranking_config: Path | None = Field(
        default=None,
        description="ranking config TOML; default: the one the artifact carries (its training "
        "config's [ranking], or weights derived from its heads)",
    )
    users: Path | None = Field(
        default=None, description="users table; default: the artifact config's"
    )
    videos: Path | None = Field(
        default=None, description="videos table; default: the artifact config's"
    )
    max_candidates: int = Field(default=2000, gt=0)
    # 1 MiB: 2000 candidates as {"video_id": <19 digits>} take about 66 kB; a body 16 times that
    # is no ranking request, and reading it would only cost memory (docs/reliability.md).
    max_body_bytes: int = Field(
        default=1 << 20, gt=0, description="request bodies larger than this get a 413"
    )
    # 100M parameters (about 380 MiB of float32): the default model has 0.6M. Checked before a
    # model is built, at start-up and on every reload (ranker.artifact.check_model_size).
    max_model_parameters: int = Field(
        default=100_000_000,
        gt=0,
        description="refuse an artifact whose config describes a larger model, before building it",
    )
    # 8: one worker ranks requests one at a time on its forward thread, and concurrency 8 is where
    # it reaches its most requests/s (docs/performance.md): a few requests read bodies and wait
    # on Redis while one computes. More in flight adds no throughput, only waiting: each request
    # past the 8th waits one more forward pass (3-13 ms at 500 candidates), and at twice the
    # sustainable rate an unbounded queue grew to seconds (bench/overload.py).
    max_in_flight: int = Field(
        default=8,
        ge=0,
        description="rank requests one worker serves at once; one more gets an immediate 503 "
        "with Retry-After instead of a queue (service/overload.py); 0: no bound",
    )
    deadline_ms: float | None = Field(
        default=None,
        gt=0,
        le=60_000,
        description="time budget of every rank request from its arrival; past it the answer is "
        "the candidates in request order with degraded: true (a request's "
        "X-Request-Deadline-Ms header may set a shorter one); unset: no deadline",
    )
    reload_interval_s: float = Field(
        default=0.0,
        ge=0,
        description="poll the artifact root and the ranking config this often and load what "
        "changed; 0: never (POST /admin/reload still works)",
    )
    admin_token: SecretStr | None = Field(
        default=None,
        description="bearer token for /admin/*; unset: the admin endpoints answer 404",
    )
    threads: int | None = Field(
        default=None,
        gt=0,
        description="intra-op threads of torch and ONNX Runtime per worker; default: 1; never "
        "more than the CPUs the process may use (affinity, cgroup quota: default_threads)",
    )
    forward_thread: bool = Field(
        default=True,
        description="run each forward pass on one dedicated thread, so the event loop keeps "
        "serving other requests' I/O meanwhile (service.engine.rank); false: on the loop",
    )
    glibc_malloc: GlibcMalloc = Field(
        default="retain",
        description="retain: keep freed memory in the process (no page faults per request, "
        "ranker/allocator.py); default: glibc's own behaviour",
    )
    # eager is the reference; the others are built from the same weights at start-up and are
    # checked against it (tests/ranker/test_backends.py, docs/performance.md)
    backend: Literal["auto", "eager", "torchscript", "onnx", "onnx-int8", "bf16"] = Field(
        default="auto",
        description="scoring backend: auto (time the engines this CPU can run on the artifact's "
        "sample requests, serve the fastest that passes its accuracy guard; ranker/autoselect.py)"
        ", or one by name: eager, torchscript, onnx, onnx-int8, bf16 (ONNX Runtime uses "
        "`threads` intra-op threads)",
    )
    redis_url: SecretStr | None = Field(
        default=None,
        description="feature store: redis://[:password@]host:port/db (rediss:// for TLS); "
        "redis+cluster://host:port (rediss+cluster://) for a Redis Cluster; "
        "unset: the in-process tables",
    )
    redis_cluster: bool = Field(
        default=False,
        description="redis_url names a node of a Redis Cluster (as the redis+cluster:// scheme "
        "does); the same store code, keys fetched per node (docs/feature-store.md)",
    )
    redis_prefix: str = Field(default=DEFAULT_PREFIX, description="key prefix the push job used")
    # 50 ms: one MGET of 501 packed records takes about 2 ms (p99, asyncio + hiredis), but the
    # timeout runs on the event loop, which each concurrent request's forward pass blocks for
    # about 10 ms; 50 ms fires on a fault, not on a busy moment, and bounds what a stalled
    # Redis adds to a request (the retry pause then spares the requests after it).
    redis_timeout_ms: float = Field(default=50.0, gt=0, description="per-request Redis budget")
    redis_pool_size: int = Field(default=16, gt=0, description="Redis connections at most")
    redis_retry_ms: float = Field(
        default=500.0,
        ge=0,
        description="after a Redis timeout or connection failure, serve defaults without trying "
        "Redis for this long",
    )
    feature_cache_entries: int = Field(
        default=1_000_000,
        ge=0,
        description="encoded users and videos kept per source and feature version (exact: a "
        "pushed version never changes); 0: fetch and encode every entity on every request",
    )
    live_state_ttl_s: int = Field(
        default=30 * 86400,
        gt=0,
        description="with Redis: a live counter's record not updated for this long expires",
    )
    live_event_id_ttl_s: int = Field(
        default=86400,
        gt=0,
        description="with Redis: how long an event id is remembered (a retry within it counts "
        "once)",
    )
    exposure_dir: Path | None = Field(
        default=None,
        description="write the exposure log (every candidate shown) and the event log (every "
        "accepted feedback event) as Parquet under DIR/exposures and DIR/events "
        "(service/exposure_log.py); unset: no logs",
    )
    exposure_rotate_rows: int = Field(
        default=500_000, gt=0, description="a log file is complete at this many rows"
    )
    # 64 MiB of Arrow columns: with 10 shown candidates and 4 heads a row takes about 150 bytes
    # in memory, so 500k rows come first; the bound keeps a worker's pending rows small.
    exposure_rotate_bytes: int = Field(
        default=64 << 20,
        gt=0,
        description="... or when its pending rows take this many bytes in memory (Arrow)",
    )
    exposure_rotate_s: float = Field(
        default=60.0,
        gt=0,
        description="... or this many seconds after its first row (at most this much is lost "
        "if the process is killed without SIGTERM)",
    )
    exposure_queue_size: int = Field(
        default=10_000,
        gt=0,
        description="requests (and event batches) waiting for the log writer; beyond it they "
        "are dropped and counted (ranker_exposure_dropped_rows_total), never waited for",
    )
    exposure_event_ids: int = Field(
        default=1_000_000,
        gt=0,
        description="a model without live counters: event ids each worker remembers, so a "
        "retried batch is logged once (live counters remember ids themselves)",
    )
    shadow_artifact: Path | None = Field(
        default=None,
        description="a second artifact (version directory) scored on a sample of requests after "
        "they are answered, for its agreement with the served model (service/shadow.py); it "
        "never affects the responses; unset: no shadow",
    )
    shadow_sample: float = Field(
        default=0.1, ge=0, le=1, description="share of rank requests the shadow scores"
    )
    shadow_queue: int = Field(
        default=4,
        ge=1,
        description="requests waiting for the shadow at most; more are dropped and counted",
    )
    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=0, le=65535)
    log_level: str = "info"


def default_threads(settings: Settings, cpus: int | None = None) -> int:
    """Intra-op threads of each worker: one when ``RANKER_THREADS`` is unset, and never more
    than the CPUs the process may use (``cpus``, default :func:`ranker.cpu.usable_cpus`: its
    affinity and cgroup quota, not the host's core count).

    Left alone, torch and ONNX Runtime start one thread per core of the host. A forward pass over
    500 candidates is a few milliseconds of small matmuls; splitting it over threads gains little
    (one worker with two threads served 74-89k candidates/s, one thread per worker as much) and
    costs everything when another process takes a core: OpenMP threads spin at their barriers
    waiting for the descheduled one, and throughput fell 5-7x (c=1 p90 7 -> 107 ms,
    docs/performance.md). A start-up measurement cannot show more threads are safe: the
    neighbour that takes a core comes later. Processes, not threads, use more cores:
    ``--workers`` up to :func:`ranker.cpu.usable_cpus`. An explicit ``RANKER_THREADS`` wins up
    to the usable CPUs; past them it is cut to them, with a warning (threads beyond the cores
    a container may run on only wait for each other)."""
    wanted = settings.threads or 1
    if cpus is None:
        from ranker.cpu import usable_cpus

        cpus = usable_cpus()
    if wanted > cpus:
        if (wanted, cpus) not in _warned:
            _warned.add((wanted, cpus))
            log.warning(
                "RANKER_THREADS=%d > %d usable CPUs (affinity, cgroup quota): %d threads",
                wanted,
                cpus,
                cpus,
            )
        return cpus
    return wanted


_warned: set[tuple[int, int]] = set()
