"""The training loop: one readable pass over the stream per epoch, validation after each.

Validation scores feed best-epoch selection and early stopping (``training/selection.py``);
``training.refit`` then retrains from scratch on every row for the selected epochs.

Per step: forward (keeping the shared representation), per-task masked losses, the weighting
strategy's backward, one optimizer step. No strategy-specific code here: every strategy goes
through ``Weighting.backward``.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from ranker.allocator import apply_glibc_malloc
from ranker.artifact import build_model, save_artifact
from ranker.config import Config
from ranker.cpu import CpuFeatures, cpu_features
from ranker.errors import TrainingError
from ranker.features import FeatureEncoder
from ranker.heads import head_loss, init_head
from ranker.history import side_codes
from ranker.model import RankingModel
from ranker.position import ShallowTower
from ranker.tables import FeatureTable
from ranker.weighting import SharedPart, build_weighting
from training.calibration import calibrate_means
from training.checkpoint import load_checkpoint, save_checkpoint
from training.data import BatchBuilder, ImpressionLog, shuffled_batches
from training.distributed import Dist, parameter_digest, shard_files
from training.encoding import fit_encoder
from training.evaluate import (
    format_table,
    gate_utilisation,
    head_metrics,
    json_ready,
    predict_split,
)
from training.samples import build_samples
from training.selection import Selected, Selector


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
    selection: Selected | None = None  # the kept validation point (None: no validation split)
    calibration: dict[str, float] = field(default_factory=dict)  # head -> mean scale factor
    precision: str = "fp32"  # what training.precision resolved to (training_precision)


class _Telemetry:
    """Appends JSON lines (step losses and weights, epoch metrics) to ``run_dir/train_log.jsonl``;
    the schema is in docs/observability.md."""

    def __init__(self, run_dir: Path, append: bool = False, enabled: bool = True) -> None:
        run_dir.mkdir(parents=True, exist_ok=True)
        self.path = run_dir / "train_log.jsonl"
        self.enabled = enabled
        # Only one process writes (rank 0 under torchrun); the others log nowhere.
        self.file = open(self.path if enabled else os.devnull, "a" if append else "w")  # noqa: SIM115
        self.started = time.perf_counter()

    def write(self, record: dict[str, Any]) -> None:
        # elapsed_s: throughput and where the time went (validation, gates), from the log alone
        record = {**record, "elapsed_s": round(time.perf_counter() - self.started, 3)}
        self.file.write(json.dumps(json_ready(record)) + "\n")
        self.file.flush()

    def close(self) -> None:
        self.file.close()


def make_optimizer(
    groups: list[dict[str, Any]], lr: float, weight_decay: float
) -> torch.optim.Optimizer:
    """Adam with its fused kernel (one pass over the parameters instead of a dozen ops per
    tensor: default training steps about 4% faster on 2 CPU threads, ``bench/train_speed.py``'s
    fused / plain ratio); the plain implementation where fused Adam is not available."""
    try:
        return torch.optim.Adam(groups, lr=lr, weight_decay=weight_decay, fused=True)
    except (RuntimeError, ValueError):
        return torch.optim.Adam(groups, lr=lr, weight_decay=weight_decay)


def build_bias_tower(config: Config, encoder: FeatureEncoder) -> ShallowTower | None:
    """The training-only position tower, when the config asks for one."""
    p = config.position
    if p.mode != "shallow_tower":
        return None
    cards = [len(encoder.vocabs[f.name].values) + 1 for f in encoder.of("bias")]
    return ShallowTower(cards, p.hidden, p.dropout)


def refit_config(config: Config, selected: Selected, keep: str) -> Config:
    """The config of a refit: every row trains (no validation split), for the selected epochs
    (the latest per-head epoch with ``keep = "per_head"``), in its own run directory."""
    t = config.training
    epochs = selected.epoch
    if keep == "per_head" and selected.task_epochs:
        epochs = max(epochs, *selected.task_epochs.values())
    return config.model_copy(
        update={
            "data": config.data.model_copy(update={"validation": False}),
            "training": t.model_copy(
                update={"refit": False, "epochs": epochs, "run_dir": t.run_dir / "refit"}
            ),
        }
    )


def training_precision(config: Config, features: CpuFeatures | None = None) -> str:
    """``fp32`` or ``bf16`` for ``training.precision``; ``auto`` is bf16 only on a CPU with
    bf16 matrix units (AMX), where autocast gave 1.49-1.53x samples/s with validation metrics
    within the seed spread of fp32 (docs/performance.md); on AVX-512 BF16 alone the gain is
    small, and without it bf16 is emulated and slower. Other devices: fp32 unless named."""
    t = config.training
    if t.precision != "auto":
        return t.precision
    if torch.device(t.device).type != "cpu":
        return "fp32"
    return "bf16" if (features or cpu_features()).amx else "fp32"


def train(
    config: Config, progress: bool = True, export: bool = True, resume: bool = False
) -> TrainResult:
    """Trains with best-epoch selection, refits on every row when ``training.refit`` is set,
    and exports.

    The refit follows the peers' protocol: the epoch count is chosen on the validation split,
    then a model trained from scratch on all rows (validation days included) for that many
    epochs is the one exported; the artifact's report keeps the selection run's validation
    metrics, the refit's own being unmeasurable. ``resume`` applies to the selection run.
    """
    dctx = Dist.from_env(config.training.device)
    if dctx.enabled and resume:
        raise TrainingError("--resume runs single-process only; resume without torchrun")
    try:
        result = _fit(config, dctx, progress, resume)
        if config.training.refit and result.selection is not None:
            keep = config.training.selection.keep
            refit = refit_config(config, result.selection, keep)
            if progress and dctx.is_main:
                print(
                    f"\nrefit on every row for {refit.training.epochs} epoch(s) "
                    f"(selected: {result.selection.as_json()})"
                )
            again = _fit(refit, dctx, progress, False, plan=result.selection)
            again.config, again.metrics, again.selection = config, result.metrics, result.selection
            again.history = result.history + [{"refit": h} for h in again.history]
            again.gate_utilisation = result.gate_utilisation
            result = again
    finally:
        dctx.close()
    if export and dctx.is_main:
        report: dict[str, Any] = {
            "validation": json_ready(result.metrics),
            "precision": result.precision,
        }
        if result.gate_utilisation is not None:
            report["gate_utilisation"] = json_ready(result.gate_utilisation)
        if result.calibration:
            report["calibration"] = result.calibration
        if result.selection is not None:
            report["selection"] = result.selection.as_json() | {
                "refit": config.training.refit,
                "keep": config.training.selection.keep,
                "criterion": config.training.selection.criterion,
            }
        e = config.export
        samples = build_samples(config, result.encoder, e.sample_requests, e.sample_candidates)
        result.artifact = save_artifact(
            result.model, result.encoder, config, report, samples=samples
        )
    return result


def _fit(
    config: Config,
    dctx: Dist,
    progress: bool = True,
    resume: bool = False,
    plan: Selected | None = None,
) -> TrainResult:
    """Fits the encoder and the model on the training split, validates every epoch (selecting
    the kept weights, ``training/selection.py``), or follows ``plan`` on every row (a refit).

    With ``resume`` it continues from ``run_dir/checkpoint.pt`` (written every
    ``checkpoint_every_steps`` steps and at every epoch end): model, optimizer, weighting and
    bias-tower state, the random generators as they were at the start of the interrupted epoch,
    and the data position (the batches of that epoch already trained are replayed through the
    data pipeline without training), so a killed run ends as an uninterrupted one would.
    """
    started = time.perf_counter()
    t = config.training
    if t.threads:
        torch.set_num_threads(t.threads)
    apply_glibc_malloc(t.glibc_malloc)  # no page faults for each step (ranker/allocator.py)
    torch.manual_seed(t.seed)
    rng = np.random.default_rng(t.seed)
    gen = torch.Generator().manual_seed(t.seed)
    device = torch.device(t.device)
    bf16 = training_precision(config) == "bf16"
    ckpt_path = t.run_dir / "checkpoint.pt"
    progress = progress and dctx.is_main
    state = load_checkpoint(ckpt_path, config) if resume else None

    log = ImpressionLog(config)
    validating = config.data.validation
    if dctx.is_main:
        log.check_validation()  # a configured split that selects nothing is an error
    selector = Selector(t.selection, config.task_names, plan) if validating or plan else None
    if state is None:
        # Fitted once, on rank 0, and shared: every rank encodes exactly alike.
        fitted = fit_encoder(config, log, progress) if dctx.is_main else None
        shared = dctx.broadcast_object(
            None if fitted is None else (json.dumps(fitted.encoder.to_json()), fitted.head_bias)
        )
        if fitted is not None:
            encoder, users, videos = fitted.encoder, fitted.users, fitted.videos
            head_bias = fitted.head_bias
        else:
            encoder = FeatureEncoder.from_json(json.loads(shared[0]))
            head_bias = shared[1]
            d = config.data
            users = FeatureTable.from_parquet(d.users, d.user_key, encoder, "user")
            videos = FeatureTable.from_parquet(d.videos, d.video_key, encoder, "video")
    else:
        encoder = FeatureEncoder.from_json(json.loads(state["encoder"]))
        d = config.data
        users = FeatureTable.from_parquet(d.users, d.user_key, encoder, "user")
        videos = FeatureTable.from_parquet(d.videos, d.video_key, encoder, "video")
    builder = BatchBuilder(config, encoder, users, videos)
    val_builder = BatchBuilder(config, encoder, users, videos, serving=True)
    model = build_model(config, encoder)
    if state is None:
        for name, bias in head_bias.items():
            init_head(model.towers[name][-1], bias)
        if model.history is not None and model.history_side:  # resumed: in the state
            model.set_history_side(torch.from_numpy(side_codes(config, encoder, videos)))
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
    optimizer = make_optimizer(groups, t.lr, t.weight_decay)
    dctx.broadcast_parameters([m for m in (model, tower, weighting) if m is not None])
    trainable = [p for g in groups for p in g["params"]]
    telemetry = _Telemetry(t.run_dir, append=state is not None, enabled=dctx.is_main)
    my_files = shard_files(log.files, dctx)
    train_rows = log.count_rows("train", my_files)
    if dctx.enabled and my_files is None:
        train_rows //= dctx.world
    # Ranks step in lock-step (one all-reduce per step): every rank runs the smallest share.
    steps_per_epoch = dctx.min_int(math.ceil(train_rows / t.batch_size))
    step_limit = steps_per_epoch if dctx.enabled else None
    if t.max_steps_per_epoch:
        steps_per_epoch = min(steps_per_epoch, t.max_steps_per_epoch)

    history: list[dict[str, Any]] = []
    metrics: dict[str, dict[str, float]] = {}
    step = 0
    rows_seen = 0
    train_seconds = 0.0
    first_epoch, skip = 1, 0
    resumed_sums: dict[str, float] | None = None
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        weighting.load_state_dict(state["weighting"])
        if tower is not None and state.get("bias_tower") is not None:
            tower.load_state_dict(state["bias_tower"])
        first_epoch, skip, step = state["epoch"], state["batches_done"], state["step"]
        history = json.loads(state["history"])
        metrics = json.loads(state["metrics"]).get("validation", {})
        resumed_sums = json.loads(state["sums"])
        rng.bit_generator.state = json.loads(state["rng_numpy"])
        gen.set_state(state["rng_shuffle"])
        if skip == 0:
            torch.set_rng_state(state["rng_torch"])
        if selector is not None and state.get("selection") is not None:
            selector.load_state_dict(state["selection"])
            if state["selection"].get("stopped"):
                first_epoch = t.epochs + 1  # it had stopped early: nothing left to train
        if progress:
            print(f"resuming {ckpt_path}: epoch {first_epoch}, {skip} batches done, step {step}")

    stopped = False

    def checkpoint(epoch: int, batches_done: int, sums: dict[str, float], epoch_rng: Any) -> None:
        if not dctx.is_main:
            return
        selection = None
        if selector is not None:
            selection = selector.state_dict() | {"stopped": stopped}
        save_checkpoint(
            ckpt_path,
            {
                "epoch": epoch,
                "batches_done": batches_done,
                "step": step,
                "model": model.state_dict(),
                "optimizer": optimizer.state_dict(),
                "weighting": weighting.state_dict(),
                "bias_tower": None if tower is None else tower.state_dict(),
                "config": config.model_dump_json(),
                "encoder": json.dumps(encoder.to_json()),
                "metrics": json.dumps(json_ready({"validation": metrics})),
                "history": json.dumps(json_ready(history)),
                "sums": json.dumps(sums),
                "rng_numpy": json.dumps(epoch_rng[0]),
                "rng_shuffle": epoch_rng[1],
                "rng_torch": torch.get_rng_state(),
                "selection": selection,
            },
        )

    for epoch in range(first_epoch, t.epochs + 1):
        model.train()
        if tower is not None:
            tower.train()
        epoch_start = time.perf_counter()
        # The generators as they are at the epoch's start: a mid-epoch checkpoint stores these,
        # so a resume rebuilds the same file order and shuffle and skips what was trained.
        epoch_rng = (rng.bit_generator.state, gen.get_state())
        sums = dict.fromkeys(config.task_names, 0.0)
        n_steps = 0
        if resumed_sums is not None and skip:
            sums = resumed_sums
        resumed_sums = None
        batches = log.record_batches(
            "train", batch_size=t.batch_size, shuffle_files=rng, files=my_files
        )
        if dctx.enabled and my_files is None:  # fewer files than ranks: stride over batches
            batches = (fb for i, fb in enumerate(batches) if i % dctx.world == dctx.rank)
        stream = (builder.build(rb, f) for f, rb in batches)
        bar = tqdm(
            total=steps_per_epoch,
            desc=f"epoch {epoch}/{t.epochs}",
            unit="step",
            disable=not progress,
            mininterval=1.0,
        )
        for batch in shuffled_batches(stream, t.batch_size, t.shuffle_buffer, gen):
            if skip:
                skip -= 1
                n_steps += 1
                bar.update(1)
                if skip == 0 and state is not None:
                    torch.set_rng_state(state["rng_torch"])
                continue
            batch = batch.to(device)
            with torch.autocast(device.type, torch.bfloat16, enabled=bf16):
                out = model.forward_detailed(batch.cat, batch.num)
            if bf16:  # the losses in fp32 (the representation stays as computed: weighting
                # differentiates the losses with respect to that very tensor)
                out.raw = {k: v.float() for k, v in out.raw.items()}
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
            if out.regulariser is not None:  # DSelect-k's entropy: gate parameters only
                out.regulariser.backward()
            dctx.average_gradients(trainable)
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
                if out.regulariser is not None:
                    record["regulariser"] = float(out.regulariser.detach())
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
            if t.checkpoint_every_steps and step % t.checkpoint_every_steps == 0:
                checkpoint(epoch, n_steps, sums, epoch_rng)
            if t.max_steps_per_epoch and n_steps >= t.max_steps_per_epoch:
                break
            if step_limit is not None and n_steps >= step_limit:
                break
        bar.close()
        train_seconds += time.perf_counter() - epoch_start
        if n_steps == 0:
            raise TrainingError("the training split produced no batches")
        mean_losses = dctx.mean_dict({k: v / n_steps for k, v in sums.items()})
        weighting.epoch_end(mean_losses)
        entry: dict[str, Any] = {"epoch": epoch, "steps": step, "train_loss": mean_losses}
        if dctx.is_main and validating:  # ranks hold identical weights: rank 0 validates
            preds = predict_split(model, val_builder, log, "validation", device=str(device))
            metrics = head_metrics(config, preds)
            entry |= {"validation": metrics, "rows": len(preds)}
            if progress:
                table = format_table(metrics)
                print(f"\nvalidation after epoch {epoch} ({len(preds)} rows):\n{table}")
        if selector is not None:  # every rank decides alike: rank 0's verdict is broadcast
            verdict = selector.update(epoch, step, metrics, model) if dctx.is_main else None
            stopped = bool(dctx.broadcast_object(verdict))
            if selector.history:
                entry["selection_score"] = selector.history[-1]["score"]
        if dctx.is_main:
            history.append(entry)
            telemetry.write(entry)
        next_rng = (rng.bit_generator.state, gen.get_state())
        checkpoint(epoch + 1, 0, dict.fromkeys(config.task_names, 0.0), next_rng)
        dctx.barrier()
        if stopped:
            if progress and plan is None:
                print(f"early stop after epoch {epoch}: no gain for {t.selection.patience} epochs")
            break
    selected = None
    if selector is not None:
        selected = selector.restore(model) if dctx.is_main else None
        if selected is not None and plan is None:
            selected.stopped_early = stopped
            if dctx.is_main:
                telemetry.write({"selection": selected.as_json()})
                if progress:
                    print(f"kept the weights of {selected.as_json()}")
            # the reported metrics are those of the kept weights
            if dctx.is_main and t.selection.keep == "per_head":
                preds = predict_split(model, val_builder, log, "validation", device=str(device))
                metrics = head_metrics(config, preds)
            elif dctx.is_main and t.selection.keep == "best":
                metrics = next(h for h in history if h.get("epoch") == selected.epoch)["validation"]
        if plan is not None:
            selected = None
        selected = dctx.broadcast_object(selected)  # every rank decides alike on a refit
    calibration: dict[str, float] = {}
    if dctx.is_main:  # mean-serving heads: the mean right on the training rows (calibration.py)
        calibration = calibrate_means(config, model, val_builder, log, str(device))
        if calibration and validating:
            preds = predict_split(model, val_builder, log, "validation", device=str(device))
            metrics = head_metrics(config, preds)
        if calibration and progress:
            print(f"mean calibration of watch-time heads (x factor): {calibration}")
    dctx.broadcast_parameters([model])  # rank 0 restored and calibrated: every rank ends alike
    gates = None
    if dctx.is_main:
        split = "validation" if validating else "train"
        gates = gate_utilisation(model, val_builder, log, split, device=str(device))
    if gates is not None:
        telemetry.write({"gate_utilisation": gates})
    telemetry.close()
    if dctx.enabled:
        (t.run_dir / f"params-rank{dctx.rank}.sha256").write_text(parameter_digest(model))
        dctx.barrier()
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
        selection=selected,
        calibration=calibration,
        precision="bf16" if bf16 else "fp32",
    )
    return result
