"""Every scoring engine on an artifact's own sample requests, as ``RANKER_BACKEND=auto`` sees
them at start-up: accuracy against fp32 eager under the artifact's guard, and the median forward
time of one request, the engines interleaved round by round (``ranker/autoselect.py``).

Beyond the service's engines it times ``bf16-eager``: the bf16 expert layers without tracing and
freezing, i.e. what freezing the bf16 graph saves (the per-call weight reshapes and column
selections it folds into constants).

    .venv/bin/python bench/engines.py --artifact artifacts/default --rounds 10 --threads 1

The CPU's matrix features are printed beside the figures: which engines win depends on them.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from machine import cpu_model  # noqa: E402

from ranker.artifact import load_artifact  # noqa: E402
from ranker.autoselect import select_engine  # noqa: E402
from ranker.backends import BACKENDS, bf16_experts  # noqa: E402
from ranker.cpu import describe  # noqa: E402
from ranker.predictor import Predictor, request_split  # noqa: E402
from ranker.scoring import RankingFormula, load_ranking_config  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--artifact", type=Path, default=ROOT / "artifacts" / "default")
    ap.add_argument("--ranking", type=Path, default=ROOT / "configs" / "ranking.toml")
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    a = load_artifact(args.artifact)
    if a.samples is None:
        raise SystemExit(f"{a.path} has no sample requests (exported before they were stored)")
    split = request_split(a.model, a.encoder)
    formula = RankingFormula(load_ranking_config(args.ranking), a.config.task_names)
    bf16_model = bf16_experts(a.model)

    def build(engine: str) -> Predictor:
        if engine == "bf16-eager":
            p = Predictor(bf16_model, a.config.tasks, "eager", args.threads, split)
            p.backend = engine
            return p
        return Predictor(a.model, a.config.tasks, engine, args.threads, split)

    engines = [*BACKENDS, "bf16-eager"]
    _, sel = select_engine(
        build,
        a.samples,
        formula.score,
        a.config.export.guard,
        engines,
        rounds=args.rounds,
        threads=args.threads,
        timed_requests=len(a.samples),
    )
    flops = a.model.flops_per_row(split)
    print(
        f"CPU: {cpu_model()}; {describe()}; torch {torch.__version__}\n"
        f"$ .venv/bin/python bench/engines.py --artifact {args.artifact} --rounds {args.rounds} "
        f"--threads {args.threads}\n"
        f"{len(a.samples)} sample requests x {a.samples.candidates} candidates, "
        f"{flops / 1e6:.2f} MFLOP per candidate as served, {args.threads} thread(s), "
        f"{args.rounds} rounds\n"
    )
    eager_ms = next(t.ms for t in sel.trials if t.engine == "eager")
    print(
        "| engine | ms per request (median) | eager / engine | max scaled error | "
        "Spearman (worst request) | top-k overlap (mean) | guard |"
    )
    print("|---|---:|---:|---:|---:|---:|---|")
    for t in sel.trials:
        err = max(t.max_error.values()) if t.max_error else float("nan")
        ms = f"{t.ms:.2f}" if t.ms is not None else "-"
        ratio = f"{eager_ms / t.ms:.2f}" if t.ms else "-"
        sp = f"{t.spearman:.6f}" if t.spearman is not None else "-"
        ov = f"{t.topk_overlap:.3f}" if t.topk_overlap is not None else "-"
        verdict = "admitted" if t.admitted else f"refused: {t.reason}"
        print(f"| {t.engine} | {ms} | {ratio} | {err:.1e} | {sp} | {ov} | {verdict} |")
    print(f"\nauto would serve: {sel.engine}")


if __name__ == "__main__":
    main()
