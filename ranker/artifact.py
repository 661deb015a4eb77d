"""The artifact: the only thing that travels from the trainer to the service.

One directory per exported version::

    <root>/<name>/<version>/
        manifest.json     format version, creation time, code version, tasks, sha256 per file,
                          offline metrics, model facts (FLOPs per row, architecture)
        config.json       the resolved training config (re-validated on load)
        ranking.json      the ranking formula that fits the heads (``Config.effective_ranking``):
                          what evaluate, tune and the service use when given no other
        encoder.json      vocabularies and normalisation statistics
        model.safetensors the weights (no pickle anywhere on this path)
        samples.safetensors (optional) encoded sample requests the service times and checks
                          its scoring engines on (ranker/samples.py)

It is written into a temporary directory beside its final place and renamed, so a reader never
sees half an artifact; it is loaded only after the format version and every checksum match.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import ranker
from ranker.config import Config
from ranker.errors import ArtifactError
from ranker.features import FeatureEncoder
from ranker.heads import output_dim
from ranker.model import RankingModel
from ranker.samples import SAMPLES_FILE, SampleRequests
from ranker.scoring import RankingConfig, RankingFormula

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
FILES = ("config.json", "encoder.json", "model.safetensors")
RANKING = "ranking.json"
"""Written since the artifact carries its ranking config; older artifacts lack it (their config's
derived ranking stands in), so it is verified when the manifest lists it, not required."""


@dataclass
class Artifact:
    path: Path
    version: str
    manifest: dict[str, Any]
    config: Config
    encoder: FeatureEncoder
    model: RankingModel
    ranking: RankingConfig
    samples: SampleRequests | None = None  # None: exported before samples were stored


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def code_version() -> str:
    """Package version plus the git commit when running from a checkout."""
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=Path(__file__).parent,
            capture_output=True,
            text=True,
            timeout=5,
            check=True,
        ).stdout.strip()
        return f"{ranker.__version__}+g{sha}"
    except (OSError, subprocess.SubprocessError):
        return ranker.__version__


def build_model(config: Config, encoder: FeatureEncoder) -> RankingModel:
    """The model a config and a fitted encoder describe (the same call on both sides)."""
    history = config.live.history if config.live else None
    feature, side = -1, []
    if history is not None:
        names = [f.name for f in encoder.categorical]
        feature = names.index(config.history_feature().name)
        side = [names.index(f.name) for f in config.history_side_features()]
    return RankingModel(
        encoder.cardinalities,
        len(encoder.numeric) + (config.live.width if config.live else 0),
        config.task_names,
        config.model,
        cat_widths=encoder.cat_widths,
        output_dims={t.name: output_dim(t) for t in config.tasks},
        history=history,
        history_feature=feature,
        history_side=side,
    )


def position_note(config: Config) -> dict[str, Any]:
    """What the served model does with position, for the manifest and the service."""
    p = config.position
    at_serving = {
        "none": "position was ignored in training",
        "feature": f"position is a feature, fixed to {p.serving_value} at serving",
        "shallow_tower": "the shallow position tower was used in training and is dropped at "
        f"serving: scores are position-free (bias added to {p.tasks} in training)",
    }[p.mode]
    return {"mode": p.mode, "at_serving": at_serving}


def save_artifact(
    model: RankingModel,
    encoder: FeatureEncoder,
    config: Config,
    metrics: dict[str, Any] | None = None,
    root: Path | None = None,
    samples: SampleRequests | None = None,
) -> Path:
    """Writes a new version under ``root/name/`` and returns its directory; ``samples``
    (:mod:`ranker.samples`) are stored beside the weights when given."""
    root = Path(root or config.export.artifact_root) / config.export.name
    root.mkdir(parents=True, exist_ok=True)
    now = datetime.now(UTC)
    version = now.strftime("%Y%m%dT%H%M%S") + f"-{os.urandom(3).hex()}"
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=root))
    try:
        (tmp / "config.json").write_text(config.model_dump_json(indent=2))
        (tmp / "encoder.json").write_text(json.dumps(encoder.to_json()))
        ranking = config.effective_ranking
        RankingFormula(ranking, config.task_names)  # fits the heads, or nothing is written
        (tmp / RANKING).write_text(ranking.model_dump_json(indent=2))
        state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
        save_file(state, str(tmp / "model.safetensors"))
        files = list(FILES)
        if samples is not None:
            samples.save(tmp / SAMPLES_FILE)
            files.append(SAMPLES_FILE)
        manifest = {
            "format_version": FORMAT_VERSION,
            "name": config.export.name,
            "version": version,
            "created": now.isoformat(),
            "code_version": code_version(),
            "tasks": [t.model_dump(mode="json") for t in config.tasks],
            "model": {
                "architecture": config.model.architecture,
                "parameters": sum(p.numel() for p in model.parameters()),
                "flops_per_row": model.flops_per_row(),
            },
            "position": position_note(config),
            "files": {f: _sha256(tmp / f) for f in (*files, RANKING)},
            "metrics": metrics or {},
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2))
        final = root / version
        os.rename(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def list_versions(path: Path) -> list[Path]:
    """Every version directory ``path`` holds: itself when it is one, else the versions one or
    two levels down (a name directory, or a root of names); temporary (dot) directories never
    count. The service's reload picks versions by name from this list only, so nothing outside
    the configured root is ever loaded."""
    path = Path(path)
    if (path / MANIFEST).is_file():
        return [path]
    if not path.is_dir():
        raise ArtifactError(f"artifact path {path} does not exist")
    versions = sorted(p.parent for p in path.glob(f"*/{MANIFEST}"))
    versions += sorted(p.parent for p in path.glob(f"*/*/{MANIFEST}"))
    return [v for v in versions if not v.name.startswith(".")]


def resolve(path: Path) -> Path:
    """A version directory itself, or the newest version under a name or root directory."""
    versions = list_versions(path)
    if not versions:
        raise ArtifactError(f"no artifact (no {MANIFEST}) under {path}")
    return max(versions, key=lambda v: v.name)


def check_model_size(
    path: Path,
    config: Config,
    encoder: FeatureEncoder,
    max_parameters: int | None = None,
    limit_name: str = "max_parameters",
) -> int:
    """The parameter count ``config.json`` and ``encoder.json`` describe, checked before anything
    is allocated: the model is built on PyTorch's ``meta`` device (shapes, no storage), its size
    is held against ``max_parameters`` (named ``limit_name`` in the error), and every shape
    against ``model.safetensors``'s header (read without its data). An edited config with
    inflated layer sizes is refused here instead of after allocating them (hundreds of MiB).
    """
    with torch.device("meta"):
        shapes = build_model(config, encoder)
    n = sum(p.numel() for p in shapes.parameters())
    if max_parameters is not None and n > max_parameters:
        mib = sum(p.numel() * p.element_size() for p in shapes.parameters()) / 2**20
        raise ArtifactError(
            f"{path}: config.json describes a model of {n:,} parameters ({mib:,.0f} MiB), "
            f"more than the {max_parameters:,} allowed ({limit_name})"
        )
    expected = {k: tuple(v.shape) for k, v in shapes.state_dict().items()}
    with safe_open(str(path / "model.safetensors"), "pt") as f:
        for key in f.keys():  # noqa: SIM118 - safe_open has keys(), no iteration
            stored = tuple(f.get_slice(key).get_shape())
            if key in expected and stored != expected[key]:
                raise ArtifactError(
                    f"{path}: weights do not fit the model: {key} is {list(stored)} in "
                    f"model.safetensors, {list(expected[key])} by config.json"
                )
    return n


def load_artifact(
    path: Path, max_parameters: int | None = None, limit_name: str = "max_parameters"
) -> Artifact:
    """Loads and verifies an artifact; raises :class:`ArtifactError` saying what is wrong.
    ``max_parameters``: refuse a model larger than that before building it
    (:func:`check_model_size`)."""
    path = resolve(path)
    try:
        manifest = json.loads((path / MANIFEST).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ArtifactError(f"{path}: unreadable manifest: {e}") from None
    if not isinstance(manifest, dict) or manifest.get("format_version") != FORMAT_VERSION:
        got = manifest.get("format_version") if isinstance(manifest, dict) else None
        raise ArtifactError(f"{path}: format version {got!r}, this code reads {FORMAT_VERSION}")
    files = manifest.get("files", {})
    optional = [f for f in (RANKING, SAMPLES_FILE) if f in files]
    for f in (*FILES, *optional):
        if f not in files:
            raise ArtifactError(f"{path}: manifest lists no checksum for {f}")
        if not (path / f).is_file():
            raise ArtifactError(f"{path}: {f} is missing")
        if _sha256(path / f) != files[f]:
            raise ArtifactError(f"{path}: checksum mismatch for {f}; the artifact is corrupt")
    try:
        config = Config.model_validate_json((path / "config.json").read_text())
        encoder = FeatureEncoder.from_json(json.loads((path / "encoder.json").read_text()))
        ranking = (
            RankingConfig.model_validate_json((path / RANKING).read_text())
            if RANKING in files
            else config.effective_ranking
        )
        check_model_size(path, config, encoder, max_parameters, limit_name)
        model = build_model(config, encoder)
        samples = SampleRequests.load(path / SAMPLES_FILE) if SAMPLES_FILE in files else None
        state = load_file(str(path / "model.safetensors"))
        missing, unexpected = model.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise ArtifactError(
                f"{path}: weights do not fit the model: missing {missing}, unexpected {unexpected}"
            )
    except ArtifactError:
        raise
    except Exception as e:  # noqa: BLE001 - any decode failure means a broken artifact
        raise ArtifactError(f"{path}: cannot load: {type(e).__name__}: {e}") from None
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    if samples is not None and (
        samples.cat.shape[2] != model.num_cat_columns
        or samples.num.shape[2] != model.embed.num_numeric
    ):
        raise ArtifactError(
            f"{path}: {SAMPLES_FILE} has {samples.cat.shape[2]} categorical and "
            f"{samples.num.shape[2]} numeric columns; the model reads "
            f"{model.num_cat_columns} and {model.embed.num_numeric}"
        )
    return Artifact(path, manifest["version"], manifest, config, encoder, model, ranking, samples)


def manifest_summary(artifact: Artifact) -> dict[str, Any]:
    return {k: artifact.manifest.get(k) for k in ("name", "version", "created", "code_version")}
