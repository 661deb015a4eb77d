"""The training loop: one readable pass over the stream per epoch, validation after each.

Per step: forward (keeping the shared representation), per-task masked losses, the weighting
strategy's backward, one optimizer step. No strategy-specific code here: every strategy goes
through ``Weighting.backward``.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from ranker.artifact import build_model, save_artifact
from ranker.config import Config
from ranker.errors import TrainingError
from ranker.features import FeatureEncoder
from ranker.heads import head_loss, init_head
from ranker.model import RankingModel
from ranker.position import ShallowTower
from ranker.tables import FeatureTable
from ranker.weighting import SharedPart, build_weighting
from training.data import BatchBuilder, ImpressionLog, shuffled_batches
from training.encoding import fit_encoder
from training.evaluate import (
    format_gate_table,
    format_table,
    gate_utilisation,
    head_metrics,
    json_ready,
    predict_split,
)


@dataclass
class TrainResult:
    config: Config
    model: RankingModel
    encoder: FeatureEncoder
    users: FeatureTable
    videos: FeatureTable
    metrics: dict[str, dict[str, float]]
    history: list[dict[str, Any]] = field(default_factory=list)
    artifact: Path | None = None
    seconds: float = 0.0
    rows_per_second: float = 0.0
    gate_utilisation: dict[str, dict[str, float]] | None = None  # task -> expert -> mean weight


class _Telemetry:
    """Appends JSON lines (step losses and weights, epoch metrics) to ``run_dir/train_log.jsonl``."""

    def __init__(self, run_dir: Path) -> None:
        run_dir.mkdir(parents=True, exist_ok=True)
        self.path = run_dir / "train_log.jsonl"
        self.file = open(self.path, "w")  # noqa: SIM115 - closed in close()

    def write(self, record: dict[str, Any]) -> None:
        self.file.write(json.dumps(json_ready(record)) + "\n")
        self.file.flush()

    def close(self) -> None:
        self.file.close()


def build_bias_tower(config: Config, encoder: FeatureEncoder) -> ShallowTower | None:
    """The training-only position tower, when the config asks for one."""
    p = config.position
    if p.mode != "shallow_tower":
        return None
    cards = [len(encoder.vocabs[f.name].values) + 1 for f in encoder.of("bias")]
    return ShallowTower(cards, p.hidden, p.dropout)


def train(config: Config, progress: bool = True, export: bool = True) -> TrainResult:
    """Fits the encoder and the model on the training split, validates every epoch, exports."""
    started = time.perf_counter()
    t = config.training
    if t.threads:
        torch.set_num_threads(t.threads)
    torch.manual_seed(t.seed)
    rng = np.random.default_rng(t.seed)
    gen = torch.Generator().manual_seed(t.seed)
    device = torch.device(t.device)

    log = ImpressionLog(config)
    fitted = fit_encoder(config, log, progress)
    encoder, users, videos = fitted.encoder, fitted.users, fitted.videos
    builder = BatchBuilder(config, encoder, users, videos)
    val_builder = BatchBuilder(config, encoder, users, videos, serving=True)
    model = build_model(config, encoder)
    for name, bias in fitted.head_bias.items():
        init_head(model.towers[name][-1], bias)
    model = model.to(device)
    tower = build_bias_tower(config, encoder)
    tower = tower.to(device) if tower is not None else None
    weighting = build_weighting(config.weighting, config.task_names).to(device)
    params = list(model.parameters())
    if tower is not None:
        params += list(tower.parameters())
    groups: list[dict[str, Any]] = [{"params": params}]
    if any(True for _ in weighting.parameters()):
        # A strategy's own parameters (log-variances, GradNorm weights) must not be decayed
        # towards 0: that would bias the weighting, not regularise the model.
        groups.append({"params": list(weighting.parameters()), "weight_decay": 0.0})
    optimizer = torch.optim.Adam(groups, lr=t.lr, weight_decay=t.weight_decay)
    telemetry = _Telemetry(t.run_dir)
    train_rows = log.dataset.count_rows(filter=log.filter("train"))
    steps_per_epoch = math.ceil(train_rows / t.batch_size)
    if t.max_steps_per_epoch:
        steps_per_epoch = min(steps_per_epoch, t.max_steps_per_epoch)

    history: list[dict[str, Any]] = []
    metrics: dict[str, dict[str, float]] = {}
    step = 0
    rows_seen = 0
    train_seconds = 0.0
    for epoch in range(1, t.epochs + 1):
        model.train()
        if tower is not None:
            tower.train()
        epoch_start = time.perf_counter()
        sums = dict.fromkeys(config.task_names, 0.0)
        n_steps = 0
        stream = (
            builder.build(rb, f)
            for f, rb in log.record_batches("train", batch_size=t.batch_size, shuffle_files=rng)
        )
        bar = tqdm(
            total=steps_per_epoch,
            desc=f"epoch {epoch}/{t.epochs}",
            unit="step",
            disable=not progress,
            mininterval=1.0,
        )
        for batch in shuffled_batches(stream, t.batch_size, t.shuffle_buffer, gen):
            batch = batch.to(device)
            out = model.forward_detailed(batch.cat, batch.num)
            if tower is not None and batch.bias is not None:
                bias_logit = tower(batch.bias)  # (B,)
                for name in config.position.tasks:
                    out.raw[name] = out.raw[name] + bias_logit
            losses = {
                task.name: head_loss(
                    task,
                    out.raw[task.name],
                    batch.labels[task.name],
                    batch.masks[task.name],
                    batch.weights.get(task.name),
                )
                for task in config.tasks
            }
            for name, value in losses.items():
                if not torch.isfinite(value):
                    raise TrainingError(
                        f"non-finite loss for task {name!r} at step {step} (epoch {epoch}): {value.item()}"
                    )
            optimizer.zero_grad(set_to_none=True)
            weights = weighting.backward(
                losses, SharedPart(model.shared_parameters(), out.representation)
            )
            optimizer.step()
            step += 1
            n_steps += 1
            rows_seen += len(batch)
            loss_values = {k: float(v.detach()) for k, v in losses.items()}
            for k, v in loss_values.items():
                sums[k] += v
            if step % 10 == 0 or n_steps == 1:
                record: dict[str, Any] = {
                    "step": step,
                    "epoch": epoch,
                    "losses": loss_values,
                    "weights": weights,
                }
                if out.gates is not None:
                    record["gates"] = out.gates.detach().mean(0).tolist()  # (T, E)
                    record["gate_experts"] = model.expert_names()  # the E columns
                telemetry.write(record)
            bar.update(1)
            if step % 10 == 0:
                bar.set_postfix(
                    {k: f"{v:.3f}" for k, v in loss_values.items()}
                    | {f"w_{k}": f"{v:.2f}" for k, v in weights.items()},
                    refresh=False,
                )
            if t.max_steps_per_epoch and n_steps >= t.max_steps_per_epoch:
                break
        bar.close()
        train_seconds += time.perf_counter() - epoch_start
        if n_steps == 0:
            raise TrainingError("the training split produced no batches")
        mean_losses = {k: v / n_steps for k, v in sums.items()}
        weighting.epoch_end(mean_losses)
        preds = predict_split(model, val_builder, log, "validation", device=str(device))
        metrics = head_metrics(config, preds)
        entry = {
            "epoch": epoch,
            "train_loss": mean_losses,
            "validation": metrics,
            "rows": len(preds),
        }
        history.append(entry)
        telemetry.write(entry)
        if progress:
            print(f"\nvalidation after epoch {epoch} ({len(preds)} rows):\n{format_table(metrics)}")
        torch.save(
            {
                "epoch": epoch,
                "step": step,
                "model": model.state_dict(),
                "optimizer": optimizer.state_dict(),
                "weighting": weighting.state_dict(),
                "bias_tower": None if tower is None else tower.state_dict(),
                "config": config.model_dump_json(),
                "encoder": json.dumps(encoder.to_json()),
                "metrics": json.dumps(json_ready({"validation": metrics})),
            },
            t.run_dir / "checkpoint.pt",
        )
    gates = gate_utilisation(model, val_builder, log, "validation", device=str(device))
    if gates is not None:
        telemetry.write({"gate_utilisation": gates})
        if progress:
            print(
                f"\ngate utilisation (mean weight per expert, validation):\n"
                f"{format_gate_table(gates)}"
            )
    telemetry.close()
    model = model.cpu().eval()
    result = TrainResult(
        config,
        model,
        encoder,
        users,
        videos,
        metrics,
        history,
        seconds=time.perf_counter() - started,
        rows_per_second=rows_seen / train_seconds if train_seconds else 0.0,
        gate_utilisation=gates,
    )
    if export:
        report: dict[str, Any] = {"validation": json_ready(metrics)}
        if gates is not None:
            report["gate_utilisation"] = json_ready(gates)
        result.artifact = save_artifact(model, encoder, config, report)
    return result
