"""Training throughput: samples/s of the default model fed by the real streaming path vs the same
batches already in memory, in one run, so the ratio shows what the input pipeline costs.

* ``parquet``: ``ImpressionLog.record_batches`` -> ``BatchBuilder.build`` -> ``shuffled_batches``
  -> one training step (forward with the shared representation, masked head losses, the
  config's weighting strategy's backward, Adam), as ``training/loop.py`` runs it.
* ``memory``: the same batches built beforehand, then the same steps.
* ``memory, plain Adam``: as ``memory`` with torch's per-tensor Adam instead of the fused one
  the trainer uses (``training.loop.make_optimizer``).
* ``memory, bf16``: as ``memory`` with the forward pass under bfloat16 autocast, as
  ``training.precision = "bf16"`` runs it (losses and optimizer in fp32).
* ``pipeline``: the input pipeline alone (no step), the streaming path's ceiling.

The CPU's matrix features (AVX2, AVX-512, VNNI, AMX) are printed beside the figures: bf16 is
fast only with AMX, close to fp32 with AVX-512 BF16 alone, slower without either.

Rounds alternate the variants (the machine is shared and noisy); medians over rounds are printed
with the parquet/memory ratio and the peak RSS of the process, and per variant the minor page
faults and kernel CPU time per step. glibc malloc is set as the trainer sets it by default
(``ranker/allocator.py``); ``--glibc-malloc default`` measures glibc's own behaviour, and
``bench/allocator.py`` compares the two in one run. The encoder and tables come from
an existing artifact (fitting an encoder is not what is measured here).

    .venv/bin/python bench/train_speed.py --steps 40 --rounds 3 --threads 2
"""

from __future__ import annotations

import argparse
import itertools
import json
import resource
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from machine import cpu_model  # noqa: E402

from ranker.allocator import apply_glibc_malloc  # noqa: E402
from ranker.artifact import build_model, load_artifact  # noqa: E402
from ranker.cpu import describe  # noqa: E402
from ranker.heads import head_loss  # noqa: E402
from ranker.tables import FeatureTable  # noqa: E402
from ranker.weighting import SharedPart, build_weighting  # noqa: E402
from training.data import Batch, BatchBuilder, ImpressionLog, shuffled_batches  # noqa: E402
from training.loop import build_bias_tower, make_optimizer  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--artifact", type=Path, default=ROOT / "artifacts" / "default")
    ap.add_argument("--steps", type=int, default=40, help="training steps per variant per round")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", type=Path, default=None, help="also write the figures here")
    ap.add_argument(
        "--glibc-malloc",
        choices=["retain", "default"],
        default="retain",
        help="as training.glibc_malloc: retain (the trainer's default) or glibc's own behaviour",
    )
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    retained = apply_glibc_malloc(args.glibc_malloc)  # as the trainer does
    torch.manual_seed(0)

    a = load_artifact(args.artifact)
    cfg, d, t = a.config, a.config.data, a.config.training
    users = FeatureTable.from_parquet(d.users, d.user_key, a.encoder, "user")
    videos = FeatureTable.from_parquet(d.videos, d.video_key, a.encoder, "video")
    builder = BatchBuilder(cfg, a.encoder, users, videos)
    log = ImpressionLog(cfg)

    def stream() -> Iterator[Batch]:
        gen = torch.Generator().manual_seed(0)
        rbs = log.record_batches("train", batch_size=t.batch_size)
        return shuffled_batches(
            (builder.build(rb, f) for f, rb in rbs), t.batch_size, t.shuffle_buffer, gen
        )

    def trainer(fused: bool, bf16: bool = False) -> Callable[[Batch], None]:
        """One training step of a fresh default model, with fused or plain Adam, the forward
        in fp32 or under bf16 autocast."""
        torch.manual_seed(0)
        model = build_model(cfg, a.encoder).train()
        tower = build_bias_tower(cfg, a.encoder)
        weighting = build_weighting(cfg.weighting, cfg.task_names)
        params = list(model.parameters()) + ([] if tower is None else list(tower.parameters()))
        groups = [{"params": params}]
        optimizer = (
            make_optimizer(groups, t.lr, t.weight_decay)
            if fused
            else torch.optim.Adam(groups, lr=t.lr, weight_decay=t.weight_decay)
        )

        def step(batch: Batch) -> None:
            with torch.autocast("cpu", torch.bfloat16, enabled=bf16):
                out = model.forward_detailed(batch.cat, batch.num)
            if bf16:
                out.raw = {k: v.float() for k, v in out.raw.items()}
            if tower is not None and batch.bias is not None:
                bias = tower(batch.bias)
                for name in cfg.position.tasks:
                    out.raw[name] = out.raw[name] + bias
            losses = {
                k.name: head_loss(
                    k,
                    out.raw[k.name],
                    batch.labels[k.name],
                    batch.masks[k.name],
                    batch.weights.get(k.name),
                )
                for k in cfg.tasks
            }
            optimizer.zero_grad(set_to_none=True)
            weighting.backward(losses, SharedPart(model.shared_parameters(), out.representation))
            optimizer.step()

        return step

    step, plain_step = trainer(fused=True), trainer(fused=False)
    bf16_step = trainer(fused=True, bf16=True)
    model = build_model(cfg, a.encoder)  # for its FLOP count

    n = args.steps
    t0 = time.perf_counter()
    memory = list(itertools.islice(stream(), n))
    prebuild = time.perf_counter() - t0
    rows = sum(len(b) for b in memory)

    def run_parquet() -> int:
        k = 0
        for b in itertools.islice(stream(), n):
            step(b)
            k += len(b)
        return k

    def run_memory() -> int:
        for b in memory:
            step(b)
        return rows

    def run_memory_plain_adam() -> int:
        for b in memory:
            plain_step(b)
        return rows

    def run_memory_bf16() -> int:
        for b in memory:
            bf16_step(b)
        return rows

    def run_pipeline() -> int:
        return sum(len(b) for b in itertools.islice(stream(), n))

    variants: dict[str, Callable[[], int]] = {
        "parquet": run_parquet,
        "memory": run_memory,
        "memory, plain Adam": run_memory_plain_adam,
        "memory, bf16": run_memory_bf16,
        "pipeline": run_pipeline,
    }
    rates: dict[str, list[float]] = {k: [] for k in variants}
    faults = {k: 0.0 for k in variants}  # minor page faults, summed over rounds
    system = {k: 0.0 for k in variants}  # kernel CPU seconds, summed over rounds
    run_memory()  # warm-up
    run_memory_plain_adam()
    run_memory_bf16()
    for _ in range(args.rounds):
        for name, fn in variants.items():
            r0 = resource.getrusage(resource.RUSAGE_SELF)
            s = time.perf_counter()
            k = fn()
            rates[name].append(k / (time.perf_counter() - s))
            r1 = resource.getrusage(resource.RUSAGE_SELF)
            faults[name] += r1.ru_minflt - r0.ru_minflt
            system[name] += r1.ru_stime - r0.ru_stime
    med = {k: float(np.median(v)) for k, v in rates.items()}
    per_step = n * args.rounds
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"CPU: {cpu_model()}; {describe()}; torch {torch.__version__}")
    print(
        f"model {cfg.model.architecture}, batch {t.batch_size}, shuffle buffer {t.shuffle_buffer},"
        f" {args.threads} threads, {n} steps x {args.rounds} rounds,"
        f" {model.flops_per_row() * 3 / 1e6:.2f} MFLOP per training sample (3x forward),"
        f" glibc malloc {'retaining freed memory' if retained else 'as configured by default'}"
    )
    print(
        "\n| variant | samples/s (median) | all rounds | page faults per step | system ms per step |"
        "\n|---|---|---|---|---|"
    )
    for k, v in med.items():
        print(
            f"| {k} | {v:,.0f} | {', '.join(f'{x:,.0f}' for x in rates[k])}"
            f" | {faults[k] / per_step:,.0f} | {system[k] / per_step * 1000:.1f} |"
        )
    print(
        f"\nparquet / memory = {med['parquet'] / med['memory']:.2f}; fused / plain Adam = "
        f"{med['memory'] / med['memory, plain Adam']:.2f}; bf16 / fp32 = "
        f"{med['memory, bf16'] / med['memory']:.2f}; "
        f"first {n} batches built in {prebuild:.2f} s; peak RSS {rss:,.0f} MiB"
    )
    if args.json is not None:
        figures = {
            k: {
                "samples_per_s": med[k],
                "faults_per_step": faults[k] / per_step,
                "system_ms_per_step": system[k] / per_step * 1000,
            }
            for k in variants
        }
        args.json.write_text(json.dumps({"retained": retained, "peak_rss_mib": rss, **figures}))


if __name__ == "__main__":
    main()
