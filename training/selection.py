"""Best-epoch selection and early stopping on the validation split.

A fixed epoch count is a guess that is wrong for most data sets: on KuaiRand the dense heads
(click, long view, watch time) overfit after the second epoch while the sparse ``like`` head is
still improving at the third. :class:`Selector` scores each validation point with the configured
criterion (``training.selection``), keeps a copy of the weights at the best one, and says when
``patience`` epochs have passed without improvement; at the end it restores the kept weights.

With ``keep = "per_head"`` it also keeps each task's tower at the point where that task's own
validation loss was lowest, and restores the shared layers (embeddings, experts, gates) at the
overall best point with each tower at its own: the like tower of epoch 3 on the shared layers of
epoch 2. The composite was never trained as such, so ``docs/kuairand.md`` measures whether it
pays.

The selected point (epochs, steps, per-head epochs) is what ``training.refit`` retrains for on
every row: the peers' protocol of choosing an epoch count on a validation day and retraining on
all days.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from ranker.config import HIGHER_IS_BETTER, SelectionConfig


@dataclass
class Selected:
    """What selection chose: the best point overall and per task (1-based epochs)."""

    epoch: int
    steps: int
    score: float
    task_epochs: dict[str, int] = field(default_factory=dict)
    stopped_early: bool = False

    def as_json(self) -> dict[str, Any]:
        return {
            "epoch": self.epoch,
            "steps": self.steps,
            "score": self.score,
            "task_epochs": self.task_epochs,
            "stopped_early": self.stopped_early,
        }


def tower_prefix(task: str) -> str:
    """State-dict prefix of one task's tower in :class:`ranker.model.RankingModel`."""
    return f"towers.{task}."


class Selector:
    """Scores validation points, keeps the best weights, decides when to stop."""

    def __init__(
        self, cfg: SelectionConfig, tasks: list[str], plan: Selected | None = None
    ) -> None:
        """``plan``: a refit's selection, chosen earlier on the validation split: no scoring,
        the weights are kept at the planned epochs (per task for ``per_head``) and training
        stops at the last of them."""
        self.cfg = cfg
        self.tasks = tasks
        self.plan = plan
        self.first_losses: dict[str, float] | None = None
        self.best: Selected | None = None
        self.best_state: dict[str, Any] | None = None
        self.task_best: dict[str, tuple[int, float]] = {}  # task -> (epoch, loss)
        self.task_state: dict[str, dict[str, Any]] = {}
        self.since_best = 0
        self.history: list[dict[str, float]] = []

    @property
    def higher_is_better(self) -> bool:
        c = self.cfg.criterion
        return c != "relative_loss" and c.split(".", 1)[1] in HIGHER_IS_BETTER

    def score(self, metrics: dict[str, dict[str, float]]) -> float:
        """The criterion at one validation point (NaN when it cannot be computed)."""
        c = self.cfg.criterion
        if c != "relative_loss":
            task, metric = c.split(".", 1)
            return float(metrics.get(task, {}).get(metric, math.nan))
        losses = {t: metrics.get(t, {}).get("loss", math.nan) for t in self.tasks}
        if self.first_losses is None:
            self.first_losses = losses
        ratios = [
            v / self.first_losses[t]
            for t, v in losses.items()
            if math.isfinite(v) and math.isfinite(self.first_losses[t]) and self.first_losses[t]
        ]
        return sum(ratios) / len(ratios) if ratios else math.nan

    def _better(self, new: float, old: float) -> bool:
        if not math.isfinite(new):
            return False
        if not math.isfinite(old):
            return True
        gain = new - old if self.higher_is_better else old - new
        return gain > self.cfg.min_delta

    def update(
        self, epoch: int, steps: int, metrics: dict[str, dict[str, float]], model: nn.Module
    ) -> bool:
        """Records the validation point after ``epoch`` (``steps`` optimizer steps so far);
        returns True when training should stop (``patience`` points without improvement)."""
        if self.plan is not None:
            return self._follow_plan(epoch, steps, model)
        s = self.score(metrics)
        self.history.append({"epoch": epoch, "score": s})
        state: dict[str, Any] | None = None
        if self.best is None or self._better(s, self.best.score):
            state = _copy_state(model)
            self.best = Selected(epoch, steps, s, dict(self.best.task_epochs) if self.best else {})
            self.best_state = state
            self.since_best = 0
        else:
            self.since_best += 1
        for t in self.tasks:
            loss = metrics.get(t, {}).get("loss", math.nan)
            if t not in self.task_best or (
                math.isfinite(loss) and loss < self.task_best[t][1] - self.cfg.min_delta
            ):
                self.task_best[t] = (epoch, loss)
                if self.cfg.keep == "per_head":
                    state = state if state is not None else _copy_state(model)
                    prefix = tower_prefix(t)
                    self.task_state[t] = {k: v for k, v in state.items() if k.startswith(prefix)}
        self.best.task_epochs = {t: e for t, (e, _) in self.task_best.items()}
        return self.cfg.patience is not None and self.since_best >= self.cfg.patience

    def _follow_plan(self, epoch: int, steps: int, model: nn.Module) -> bool:
        plan = self.plan
        assert plan is not None
        if epoch == plan.epoch:
            self.best = Selected(epoch, steps, math.nan, dict(plan.task_epochs))
            self.best_state = _copy_state(model)
        if self.cfg.keep == "per_head":
            for t, e in plan.task_epochs.items():
                if e == epoch:
                    prefix = tower_prefix(t)
                    self.task_state[t] = {
                        k: v.detach().clone()
                        for k, v in model.state_dict().items()
                        if k.startswith(prefix)
                    }
        return epoch >= self.last_planned_epoch

    @property
    def last_planned_epoch(self) -> int:
        """Epochs a refit needs: the selected one, or the latest per-head one."""
        plan = self.plan
        assert plan is not None
        if self.cfg.keep == "per_head" and plan.task_epochs:
            return max(plan.epoch, *plan.task_epochs.values())
        return plan.epoch

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to go on selecting after a ``--resume``."""
        return {
            "first_losses": self.first_losses,
            "best": None if self.best is None else self.best.as_json(),
            "best_state": self.best_state,
            "task_best": self.task_best,
            "task_state": self.task_state,
            "since_best": self.since_best,
            "history": self.history,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.first_losses = state["first_losses"]
        self.best = None if state["best"] is None else Selected(**state["best"])
        self.best_state = state["best_state"]
        self.task_best = {k: tuple(v) for k, v in state["task_best"].items()}  # type: ignore[misc]
        self.task_state = state["task_state"]
        self.since_best = state["since_best"]
        self.history = state["history"]

    def restore(self, model: nn.Module) -> Selected | None:
        """Loads the kept weights into ``model`` (nothing for ``keep = "last"``)."""
        if self.best is None or self.cfg.keep == "last":
            return self.best
        assert self.best_state is not None
        state = dict(self.best_state)
        if self.cfg.keep == "per_head":
            for part in self.task_state.values():
                state.update(part)
        model.load_state_dict(state)
        return self.best


def _copy_state(model: nn.Module) -> dict[str, Any]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}
