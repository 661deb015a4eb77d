"""What the benchmarks share: a synthetic world per seed, and train-then-score on its truth."""

from __future__ import annotations

import statistics
import sys
import tomllib
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from ranker.config import Config, _apply_override, parse_config  # noqa: E402
from ranker.scoring import RankingFormula, load_ranking_config  # noqa: E402
from training.data import BatchBuilder, ImpressionLog  # noqa: E402
from training.evaluate import Predictions, head_metrics, predict_split  # noqa: E402
from training.loop import train  # noqa: E402
from training.synth import WorldConfig, generate  # noqa: E402
from training.truth import truth_columns, truth_metrics  # noqa: E402


def world_for(seed: int, requests: int, out: Path, **knobs: Any) -> Path:
    """A world of ``requests`` x 20 impressions (users and videos scaled with it)."""
    generate(
        WorldConfig(
            seed=seed,
            n_users=max(requests // 3, 500),
            n_videos=max(requests // 5, 500),
            n_requests=requests,
            **knobs,
        ),
        out,
        progress=False,
    )
    return out


def world_config(world: Path, run_dir: Path, overrides: list[str], edit=None) -> Config:  # noqa: ANN001
    """The default config pointed at ``world``, with ``--set``-style overrides and an optional
    function editing the raw dict (for list entries such as tasks)."""
    data = tomllib.loads((ROOT / "configs/default.toml").read_text())
    for o in [
        f'data.log="{world / "log"}"',
        f'data.users="{world / "users.parquet"}"',
        f'data.videos="{world / "videos.parquet"}"',
        f'training.run_dir="{run_dir}"',
        *overrides,
    ]:
        _apply_override(data, o)
    if edit is not None:
        edit(data)
    return parse_config(data)


def train_and_score(
    cfg: Config, seed: int, k: int = 10
) -> tuple[Predictions, dict[str, dict[str, float]], dict[str, dict[str, float]]]:
    """Trains (no export), predicts the validation days as served; logged and truth metrics."""
    r = train(cfg, progress=False, export=False)
    log = ImpressionLog(cfg)
    names = log.dataset.schema.names
    extra = [*truth_columns(cfg, names).values(), *(["position"] if "position" in names else [])]
    builder = BatchBuilder(cfg, r.encoder, r.users, r.videos, extra, serving=True)
    preds = predict_split(r.model, builder, log, "validation")
    formula = RankingFormula(load_ranking_config(ROOT / "configs/ranking.toml"), cfg.task_names)
    return preds, head_metrics(cfg, preds), truth_metrics(cfg, preds, formula, k=k, seed=seed)


def mean_std(xs: list[float]) -> str:
    if len(xs) == 1:
        return f"{xs[0]:.4f}"
    return f"{statistics.mean(xs):.4f} ± {statistics.stdev(xs):.4f}"


def markdown_table(rows: dict[str, dict[str, list[float]]]) -> str:
    """``{row: {column: [values over seeds]}}`` -> markdown with mean ± std cells."""
    cols = list(next(iter(rows.values())))
    lines = ["| | " + " | ".join(cols) + " |", "|---|" + "---|" * len(cols)]
    for name, cells in rows.items():
        lines.append(f"| {name} | " + " | ".join(mean_std(cells[c]) for c in cols) + " |")
    return "\n".join(lines)
