"""The cost part of ``bench/weighting.py`` when it runs alone (``--cost-only``): the step-time
ratio to equal weighting of every strategy in both gradient modes, optionally for a second
checkout of the code (``--baseline PATH``: e.g. ``git worktree add /tmp/wbase main``) timed in the
same invocation, so that a change to the strategies is reported as before/after ratios.

The baseline is timed by the same bench script in a child process whose imports of ``ranker`` and
``training`` come from ``PATH`` (environment variable :data:`CODE_ENV`); each process times its
strategies against its own equal-weighting reference stepped alternately with them, so load from
other jobs cancels in each ratio. Only standard-library imports here: ``bench/weighting.py``
imports this module, not the other way round.

    .venv/bin/python bench/weighting.py --cost-only --requests 800 --baseline /tmp/wbase
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

CODE_ENV = "WEIGHTING_BENCH_CODE"
"""Environment variable: the checkout whose ``ranker`` / ``training`` the bench imports."""

COST_START = "<!-- cost table: written by bench/weighting.py --cost-only -->"
COST_END = "<!-- end of cost table -->"
"""Markers of the block ``--cost-only`` rewrites in ``weighting.md`` (the rest is left alone)."""


def code_root(default: Path) -> Path:
    """The checkout to import the strategies from: :data:`CODE_ENV` if set, else ``default``."""
    return Path(os.environ.get(CODE_ENV, str(default))).resolve()


def time_baseline(baseline: Path, argv: list[str]) -> dict[str, list[float]]:
    """Runs ``bench/weighting.py --cost-only`` (this script, the same timing flags ``argv``) on
    the ``baseline`` checkout's code in a child process; returns its per-round ratios."""
    with tempfile.TemporaryDirectory() as td:
        raw = Path(td) / "baseline.json"
        script = Path(__file__).resolve().parent / "weighting.py"
        env = os.environ | {CODE_ENV: str(baseline.resolve()), "PYTHONPATH": str(baseline)}
        cmd = [sys.executable, str(script), *argv, "--cost-json", str(raw)]
        subprocess.run(cmd, env=env, check=True)
        return json.loads(raw.read_text())["timing"]


def ratio_cell(ratios: list[float] | None) -> str:
    """``median (min-max)`` of per-round ratios, empty when there are none."""
    if not ratios:
        return ""
    return f"{statistics.median(ratios):.2f} ({min(ratios):.2f}-{max(ratios):.2f})"


def cost_table(
    timing: dict[str, list[float]], baseline: dict[str, list[float]] | None = None
) -> str:
    """Markdown: one row per strategy with its representation- and parameters-mode ratios (and
    the baseline's, when given)."""
    names = list(dict.fromkeys(label.split(" ")[0] for label in timing))
    cols = ["representation", "parameters"]
    head = ["strategy"]
    for mode in cols:
        head += [f"{mode} (baseline)", mode] if baseline is not None else [mode]
    lines = ["| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 1)]
    for name in names:
        cells = [name]
        for mode in cols:
            label = f"{name} ({mode[:3]})"
            own = timing.get(label, timing.get(name) if mode == "representation" else None)
            if baseline is not None:
                base = baseline.get(label, baseline.get(name) if mode == "representation" else None)
                cells.append(ratio_cell(base))
            cells.append(ratio_cell(own))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def cost_report(
    timing: dict[str, list[float]],
    baseline: dict[str, list[float]] | None,
    baseline_path: str | None,
    machine: str,
    date: str,
    command: str,
    equal_ms: list[float],
    rounds: int,
    steps: int,
) -> str:
    """The markdown block: machine, date, command, method, and :func:`cost_table`."""
    base = (
        f" The `(baseline)` columns time the code of `{baseline_path}` the same way, in a child "
        f"process of the same invocation, before this checkout's."
        if baseline is not None
        else ""
    )
    eq = statistics.median(equal_ms) if equal_ms else float("nan")
    return (
        f"- Machine: {machine}; shared with other jobs while it ran (measured under load: "
        f"equal weighting took {eq:.0f} ms/step, median).\n"
        f"- Date: {date}. Command: `{command}`\n"
        f"- Per-step time (default model, batch 2048, forward + losses + `Weighting.backward` + "
        f"Adam) divided by that of an equal-weighting reference stepped alternately with it on "
        f"the same batches, {steps} steps per round, median (min-max) over {rounds} rounds. "
        f"Loss strategies have no mode: their ratio is in the representation column; the "
        f"`equal` row is a second equal-weighting model, its distance from 1.00 the noise.{base}"
        f"\n\n{cost_table(timing, baseline)}\n"
    )


def write_cost_block(md: Path, block: str) -> None:
    """Replaces the text between :data:`COST_START` and :data:`COST_END` in ``md`` by ``block``
    (appends the markers and the block when they are missing)."""
    md.parent.mkdir(parents=True, exist_ok=True)
    text = md.read_text() if md.exists() else ""
    if COST_START in text and COST_END in text:
        head, _, rest = text.partition(COST_START)
        _, _, tail = rest.partition(COST_END)
        text = f"{head}{COST_START}\n{block}{COST_END}{tail}"
    else:
        text = f"{text.rstrip()}\n\n{COST_START}\n{block}{COST_END}\n"
    md.write_text(text)
