"""What the CPU this process runs on can do, and how many of its cores the process may use.

Two facts decide how fast a forward pass is on a given machine and neither is the host's core
count:

* **Matrix features**: AVX2, AVX-512, VNNI (int8 dot products) and AMX (bf16 and int8 tile
  units). torch sends bf16 matmuls to AMX by itself where it exists (2.7-7.7x fp32 on a Xeon,
  docs/performance.md); on a CPU with only AVX-512 BF16 the gain is smaller, and on AVX2 alone
  bf16 is emulated and slower. The service times its candidate engines on start-up instead of
  trusting these flags; the flags only decide which candidates are worth timing, and every
  benchmark prints them beside its figures.
* **Usable CPUs**: a container limited by a CPU quota (cgroup v2 ``cpu.max``, v1
  ``cpu.cfs_quota_us``) or pinned to some cores (``sched_setaffinity``, cpusets) sees the host's
  core count in ``os.cpu_count()``; sizing thread pools by that oversubscribes the cores it really
  has, and OpenMP's spinning threads then stall each other (one core taken by another process cut
  throughput 5-7x with one thread per host core).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

# /proc/cpuinfo flag -> the name printed beside benchmark figures
_FLAGS = {
    "avx2": "avx2",
    "avx512f": "avx512",
    "avx512_vnni": "avx512_vnni",
    "avx_vnni": "avx_vnni",
    "avx512_bf16": "avx512_bf16",
    "amx_bf16": "amx_bf16",
    "amx_int8": "amx_int8",
}


@dataclass(frozen=True)
class CpuFeatures:
    """The matrix-relevant instruction sets the CPU reports (``/proc/cpuinfo`` flags)."""

    flags: frozenset[str]

    @property
    def bf16(self) -> bool:
        """Native bf16 dot products (AVX-512 BF16 or AMX): bf16 engines are worth timing."""
        return bool(self.flags & {"avx512_bf16", "amx_bf16"})

    @property
    def amx(self) -> bool:
        return "amx_bf16" in self.flags

    @property
    def vnni(self) -> bool:
        """int8 dot products (AVX-512 VNNI, AVX-VNNI or AMX int8): int8 engines are worth timing."""
        return bool(self.flags & {"avx512_vnni", "avx_vnni", "amx_int8"})

    def summary(self) -> str:
        """E.g. ``avx2 avx512 avx512_vnni avx512_bf16`` (``none`` without any of them)."""
        names = [n for f, n in _FLAGS.items() if f in self.flags]
        return " ".join(names) or "none"


def cpu_features(cpuinfo: Path = Path("/proc/cpuinfo")) -> CpuFeatures:
    """The flags of the first processor in ``cpuinfo`` that this module knows (none where the
    file is missing: not Linux, then nothing is assumed)."""
    try:
        text = cpuinfo.read_text()
    except OSError:
        return CpuFeatures(frozenset())
    for line in text.splitlines():
        if line.startswith("flags"):
            present = set(line.split(":", 1)[1].split())
            return CpuFeatures(frozenset(f for f in _FLAGS if f in present))
    return CpuFeatures(frozenset())


def _cgroup_paths(root: Path) -> tuple[list[Path], list[Path]]:
    """This process's cgroup v2 directory and its v1 ``cpu`` controller directory, each with its
    ancestors (a quota on a parent limits the children), from ``root/proc/self/cgroup``."""
    v2: list[Path] = []
    v1: list[Path] = []
    try:
        lines = (root / "proc/self/cgroup").read_text().splitlines()
    except OSError:
        return v2, v1
    for line in lines:
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        _, controllers, rel = parts
        rel_path = Path(rel.lstrip("/"))
        chain = [rel_path, *rel_path.parents]
        if controllers == "":
            v2 = [root / "sys/fs/cgroup" / p for p in chain]
        elif "cpu" in controllers.split(","):
            base = root / "sys/fs/cgroup" / controllers
            alt = root / "sys/fs/cgroup/cpu"
            v1 = [b / p for p in chain for b in (base, alt)]
    return v2, v1


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except OSError:
        return None


def cgroup_cpu_limit(root: Path = Path("/")) -> float | None:
    """The CPU quota of this process's cgroup in cores (``cpu.max`` ``"200000 100000"`` -> 2.0),
    the tightest along its ancestors; ``None`` where there is none (``max``) or no cgroup file
    can be read. ``root`` is the filesystem root (tests point it at a fake tree)."""
    v2, v1 = _cgroup_paths(root)
    limits: list[float] = []
    for d in v2:
        text = _read(d / "cpu.max")
        if text:
            quota, _, period = text.partition(" ")
            if quota != "max" and period.strip().isdigit() and quota.isdigit():
                limits.append(int(quota) / max(1, int(period)))
    for d in v1:
        quota, period = _read(d / "cpu.cfs_quota_us"), _read(d / "cpu.cfs_period_us")
        # v1 writes -1 for "no quota"
        if quota and period and quota.isdigit() and period.isdigit() and int(quota) > 0:
            limits.append(int(quota) / max(1, int(period)))
    return min(limits) if limits else None


def usable_cpus(root: Path = Path("/"), affinity: set[int] | None = None) -> int:
    """The cores this process may really use: the CPUs it is allowed to run on
    (``os.sched_getaffinity``), fewer where a cgroup quota allows less (rounded up: a quota of
    1.5 cores still keeps two threads busy part of the time), at least 1."""
    if affinity is None:
        try:
            affinity = os.sched_getaffinity(0)
        except (AttributeError, OSError):
            affinity = set(range(os.cpu_count() or 1))
    cpus = max(1, len(affinity))
    limit = cgroup_cpu_limit(root)
    if limit is not None:
        cpus = min(cpus, max(1, math.ceil(limit - 1e-9)))
    return cpus


def describe() -> str:
    """One line for benchmark headers: usable CPUs and matrix features."""
    return f"{usable_cpus()} usable CPUs, matrix features: {cpu_features().summary()}"
