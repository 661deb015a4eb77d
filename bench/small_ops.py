"""The small ops around the bf16 expert layers (relu, casts, copies): variants of the ``bf16``
engine timed against it on an artifact's own sample requests, interleaved in one process.

Every round runs the variants back to back on each sample request, each variant first in
turn (so a noisy neighbour slows them alike), and takes each variant's median request time. The figure per variant is the median of
``bf16-unfused / variant`` over every request of every round, the two timed back to back (above 1: the
variant is faster), with its 10th-90th percentiles, and the spread of the per-round ratios.

* ``bf16-unfused``: the engine before these changes: expert banks in bf16 (``ExpertBank``'s own
  forward: ``addmm``, then ``relu_``), the gates' ``torch.softmax``, traced and frozen.
* ``bf16+fused-relu``: the first expert layer (one ``(B, In) @ (In, E*H1)`` product) through
  oneDNN's linear with relu in its epilogue (``mkldnn::_linear_pointwise``), same freezing.
* ``bf16``: the engine as served (``ranker/backends.py``): fused relu, and the gates' softmax
  as ``exp(x - max) / sum`` (:func:`ranker.modules.softmax_short`).
* ``bf16+inductor``: the bf16 model through ``torch.compile`` (inductor, ``freezing=True``,
  dynamic batch axis): the compiler fuses relu and the casts into the matmuls' epilogues. Its
  compile time is printed: the service builds engines at start-up and on every reload.

    .venv/bin/python bench/small_ops.py --artifact artifacts/default --rounds 40 --threads 1
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from machine import cpu_model  # noqa: E402

from ranker import modules  # noqa: E402
from ranker.artifact import load_artifact  # noqa: E402
from ranker.backends import Scorer, _TupleOutputs, bf16_experts, bf16_scorer  # noqa: E402
from ranker.cpu import describe  # noqa: E402
from ranker.features import Encoded  # noqa: E402
from ranker.model import RankingModel  # noqa: E402
from ranker.modules import ColumnSplit  # noqa: E402
from ranker.predictor import request_split  # noqa: E402


def inductor_scorer(model: RankingModel, split: ColumnSplit | None) -> Scorer:
    """The bf16 model compiled by inductor with freezing; compiled on the first call."""
    import torch._inductor.config as inductor_config

    inductor_config.freezing = True
    wrapped = _TupleOutputs(bf16_experts(model, fuse_relu=False), split).eval()  # it fuses
    compiled = torch.compile(wrapped, dynamic=True)
    tasks = wrapped.tasks

    @torch.no_grad()
    def score(cat: np.ndarray, num: np.ndarray) -> dict[str, torch.Tensor]:
        out = compiled(torch.from_numpy(cat), torch.from_numpy(num))
        return dict(zip(tasks, out, strict=True))

    return score


@contextmanager
def torch_softmax() -> Iterator[None]:
    """Builds (traces) under it run the gates' softmax as ``torch.softmax``, as before
    :func:`ranker.modules.softmax_short`."""
    saved = modules.softmax_short
    modules.softmax_short = lambda x: torch.softmax(x, dim=-1)
    try:
        yield
    finally:
        modules.softmax_short = saved


def before(fuse_relu: bool) -> Callable[[RankingModel, ColumnSplit | None], Scorer]:
    def build(m: RankingModel, s: ColumnSplit | None) -> Scorer:
        with torch_softmax():
            return bf16_scorer(m, s, fuse_relu=fuse_relu)

    return build


VARIANTS: dict[str, Callable[[RankingModel, ColumnSplit | None], Scorer]] = {
    "bf16-unfused": before(fuse_relu=False),
    "bf16+fused-relu": before(fuse_relu=True),
    "bf16": lambda m, s: bf16_scorer(m, s),
    "bf16+inductor": inductor_scorer,
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--artifact", type=Path, default=ROOT / "artifacts" / "default")
    ap.add_argument("--rounds", type=int, default=40)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--variants", default=",".join(VARIANTS))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    names = args.variants.split(",")
    if names[0] != "bf16-unfused" or any(n not in VARIANTS for n in names):
        raise SystemExit(
            f"error: --variants must start with bf16-unfused and name {list(VARIANTS)}"
        )
    a = load_artifact(args.artifact)
    if a.samples is None:
        raise SystemExit(f"error: {a.path} has no sample requests")
    split = request_split(a.model, a.encoder)
    requests = [a.samples.request(i) for i in range(len(a.samples))]
    ref = VARIANTS["bf16-unfused"](a.model, split)
    scorers: dict[str, Scorer] = {}
    build_s: dict[str, float] = {}
    for n in names:
        t0 = time.perf_counter()
        scorers[n] = VARIANTS[n](a.model, split)
        for r in requests[:2]:  # first calls: compilation, oneDNN primitive caches
            scorers[n](r.cat, r.num)
        build_s[n] = time.perf_counter() - t0
    diff = {
        n: max(
            float((scorers[n](r.cat, r.num)[t] - ref(r.cat, r.num)[t]).abs().max())
            for r in requests
            for t in a.model.tasks
        )
        for n in names
    }
    per_round: dict[str, list[float]] = {n: [] for n in names}
    paired: dict[str, list[float]] = {n: [] for n in names}  # bf16 / variant, same request
    with torch.inference_mode():
        for k in range(args.rounds):
            ts: dict[str, list[float]] = {n: [] for n in names}
            for i, r in enumerate(requests):  # the variants back to back on each request
                shift = (k + i) % len(names)  # and each one first in turn
                for n in names[shift:] + names[:shift]:
                    t0 = time.perf_counter()
                    scorers[n](r.cat, r.num)
                    ts[n].append(time.perf_counter() - t0)
            for n in names:
                per_round[n].append(statistics.median(ts[n]) * 1e3)
                paired[n] += [b / v for b, v in zip(ts["bf16-unfused"], ts[n], strict=True)]
    softmax_us = softmax_op(a.model, split, requests[0], args.rounds)
    load = Path("/proc/loadavg").read_text().split()[:3]
    print(
        f"CPU: {cpu_model()}; {describe()}; torch {torch.__version__}; load average "
        f"{' '.join(load)}\n$ .venv/bin/python bench/small_ops.py --artifact {args.artifact} "
        f"--rounds {args.rounds} --threads {args.threads} --variants {args.variants}\n"
        f"{len(requests)} sample requests x {a.samples.candidates} candidates, "
        f"{args.threads} thread(s), {args.rounds} rounds interleaved\n"
    )
    print(
        "| variant | ms per request (median of rounds) | bf16-unfused / variant, paired (median) | "
        "p10-p90 | per-round ratio, min-max | max raw diff vs bf16-unfused | build + 2 calls, s |"
    )
    print("|---|---:|---:|---|---|---:|---:|")
    for n in names:
        ratios = [b / v for b, v in zip(per_round["bf16-unfused"], per_round[n], strict=True)]
        q = np.quantile(paired[n], [0.1, 0.5, 0.9])
        print(
            f"| {n} | {statistics.median(per_round[n]):.2f} | {q[1]:.3f} | "
            f"{q[0]:.3f}-{q[2]:.3f} | {min(ratios):.3f}-{max(ratios):.3f} | {diff[n]:.1e} | "
            f"{build_s[n]:.1f} |"
        )

    print(
        f"\nThe gates' softmax alone on this model's logits {softmax_us['shape']}: torch.softmax "
        f"{softmax_us['torch']:.1f} us, softmax_short {softmax_us['short']:.1f} us (medians of "
        f"{args.rounds} interleaved rounds of 50 calls), ratio "
        f"{softmax_us['torch'] / softmax_us['short']:.2f}"
    )


def softmax_op(
    model: RankingModel, split: ColumnSplit | None, request: Encoded, rounds: int
) -> dict:
    """``torch.softmax`` against :func:`ranker.modules.softmax_short` on the gate logits of
    one request's rows (their shape: what the kernel's speed depends on)."""
    with torch.inference_mode():
        if model.gate is None:
            return {"shape": "(no softmax gate)", "torch": float("nan"), "short": 1.0}
        emb = model.embed(torch.from_numpy(request.cat), torch.from_numpy(request.num))
        logits = model.gate(emb).view(emb.shape[0], model.n_gates, -1)
        times: dict[str, list[float]] = {"torch": [], "short": []}
        fns = {"torch": lambda x: torch.softmax(x, dim=-1), "short": modules.softmax_short}
        for _ in range(rounds):
            for name, fn in fns.items():
                t0 = time.perf_counter()
                for _ in range(50):
                    fn(logits)
                times[name].append((time.perf_counter() - t0) / 50 * 1e6)
    out: dict = {k: statistics.median(v) for k, v in times.items()}
    out["shape"] = tuple(logits.shape)
    return out


if __name__ == "__main__":
    main()
