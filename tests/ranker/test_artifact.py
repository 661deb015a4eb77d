import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from ranker.artifact import FORMAT_VERSION, load_artifact, resolve
from ranker.errors import ArtifactError


def copy(src: Path, tmp: Path) -> Path:
    dst = tmp / "default" / src.name
    shutil.copytree(src, dst)
    return dst


def test_save_then_load_gives_identical_outputs(tiny_trained) -> None:  # noqa: ANN001
    a = load_artifact(tiny_trained.artifact)
    cat = torch.randint(0, 2, (7, len(a.encoder.cardinalities)))
    num = torch.randn(7, len(a.encoder.numeric))
    with torch.inference_mode():
        before = tiny_trained.model(cat, num)
        after = a.model(cat, num)
    for k in before:
        assert torch.equal(before[k], after[k])
    m = json.loads((a.path / "manifest.json").read_text())
    assert m["format_version"] == FORMAT_VERSION and set(m["files"]) >= {"model.safetensors"}
    assert m["metrics"]["validation"]["click"]["auc"] is not None


def test_artifact_with_one_changed_byte_is_refused(tiny_artifact: Path, tmp_path: Path) -> None:
    bad = copy(tiny_artifact, tmp_path)
    data = bytearray((bad / "model.safetensors").read_bytes())
    data[len(data) // 2] ^= 0x01
    (bad / "model.safetensors").write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match="checksum mismatch for model.safetensors"):
        load_artifact(bad)


def test_other_format_version_is_refused(tiny_artifact: Path, tmp_path: Path) -> None:
    bad = copy(tiny_artifact, tmp_path)
    m = json.loads((bad / "manifest.json").read_text())
    m["format_version"] = 999
    (bad / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(ArtifactError, match="format version 999"):
        load_artifact(bad)


def test_missing_file_is_refused(tiny_artifact: Path, tmp_path: Path) -> None:
    bad = copy(tiny_artifact, tmp_path)
    (bad / "encoder.json").unlink()
    with pytest.raises(ArtifactError, match="encoder.json is missing"):
        load_artifact(bad)


def test_resolve_picks_the_newest_version(tiny_artifact: Path, tmp_path: Path) -> None:
    old = copy(tiny_artifact, tmp_path)
    new = old.parent / "99990101T000000-ffffff"
    shutil.copytree(old, new)
    assert resolve(tmp_path) == new
    assert resolve(old.parent) == new
    with pytest.raises(ArtifactError, match="no artifact"):
        (tmp_path / "empty").mkdir()
        resolve(tmp_path / "empty")


def test_load_artifact_has_the_checkpointed_metrics(tiny_trained) -> None:  # noqa: ANN001
    a = load_artifact(tiny_trained.artifact)
    assert np.isclose(
        a.manifest["metrics"]["validation"]["click"]["auc"], tiny_trained.metrics["click"]["auc"]
    )


def inflate(artifact: Path, hidden: int) -> None:
    """Rewrites the artifact's config with experts of one ``hidden``-unit layer (the weights
    stay), and its checksum with it: a config edited by hand that passes the checksums."""
    import hashlib

    config = json.loads((artifact / "config.json").read_text())
    config["model"]["expert_hidden"] = [hidden]
    (artifact / "config.json").write_text(json.dumps(config))
    manifest = json.loads((artifact / "manifest.json").read_text())
    digest = hashlib.sha256((artifact / "config.json").read_bytes()).hexdigest()
    manifest["files"]["config.json"] = digest
    (artifact / "manifest.json").write_text(json.dumps(manifest))


def test_a_model_over_the_size_limit_is_refused_naming_the_limit(
    tiny_artifact: Path, tmp_path: Path
) -> None:
    bad = copy(tiny_artifact, tmp_path)
    inflate(bad, 400_000)
    with pytest.raises(
        ArtifactError, match=r"parameters .*more than the 1,000,000 allowed \(lim\)"
    ):
        load_artifact(bad, max_parameters=1_000_000, limit_name="lim")


def test_layer_sizes_that_disagree_with_the_weights_are_named(
    tiny_artifact: Path, tmp_path: Path
) -> None:
    bad = copy(tiny_artifact, tmp_path)
    inflate(bad, 33)
    with pytest.raises(ArtifactError, match=r"weights do not fit .* in model\.safetensors"):
        load_artifact(bad)
    assert load_artifact(tiny_artifact, max_parameters=100_000).model is not None
