"""The trainer with PLE and a multi-valued feature, end to end on the tiny world: one epoch,
gate utilisation in the log and the manifest, and an artifact that reloads to the same scores."""

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch

from ranker.artifact import load_artifact
from ranker.config import load_config, parse_config
from tests.conftest import DEFAULT_CONFIG, tiny_overrides
from training.loop import train


def test_one_epoch_of_ple_with_tags_trains_logs_gates_and_exports(
    tiny_world: Path, tmp_path: Path
) -> None:
    videos = pq.read_table(tiny_world / "videos.parquet")
    cat = pc.cast(videos.column("category"), pa.string())
    chan = pc.cast(pc.bit_wise_and(videos.column("channel_id"), 3), pa.string())
    tags = pc.binary_join_element_wise(cat, chan, ",")  # "3,1": two values per video
    pq.write_table(videos.append_column("tags", tags), tmp_path / "videos.parquet")
    overrides = [
        *tiny_overrides(tiny_world, tmp_path),
        'model.architecture="ple"',
        "model.ple_levels=2",
        "model.gate_dropout=0.1",
        "training.epochs=1",
        f'data.videos="{tmp_path / "videos.parquet"}"',
    ]
    base = load_config(DEFAULT_CONFIG, overrides).model_dump(mode="json")
    base["features"].append(
        {
            "name": "tags",
            "source": "video",
            "kind": "categorical",
            "separator": ",",
            "max_values": 3,
        }
    )
    cfg = parse_config(base)
    res = train(cfg, progress=False, export=True)
    assert set(res.metrics) == set(cfg.task_names)
    names = res.model.expert_names()
    assert res.gate_utilisation is not None and list(res.gate_utilisation) == cfg.task_names
    for task, row in res.gate_utilisation.items():
        assert list(row) == names and abs(sum(row.values()) - 1) < 1e-6
        assert all(row[n] == 0 for n in names if not n.startswith((task + ".", "shared.")))
    records = [
        json.loads(x) for x in (tmp_path / "run" / "train_log.jsonl").read_text().split("\n") if x
    ]
    step = next(r for r in records if "gates" in r)
    assert step["gate_experts"] == names and np.asarray(step["gates"]).shape == (4, len(names))
    assert records[-1]["gate_utilisation"] == res.gate_utilisation
    assert res.artifact is not None
    art = load_artifact(res.artifact)
    assert art.manifest["metrics"]["gate_utilisation"] == res.gate_utilisation
    widths = {f.name: f.width for f in art.encoder.categorical}
    assert widths["tags"] == 3 and art.encoder.vocabs["tags"].values.size > 4
    x_cat = torch.randint(0, 2, (5, sum(art.encoder.cat_widths)))
    x_num = torch.randn(5, len(art.encoder.numeric))
    a, b = art.model(x_cat, x_num), res.model(x_cat, x_num)
    assert all(torch.allclose(a[k], b[k]) for k in a)


def test_one_epoch_of_cross_stitch_trains_and_exports(tiny_world: Path, tmp_path: Path) -> None:
    overrides = [
        *tiny_overrides(tiny_world, tmp_path),
        'model.architecture="cross_stitch"',
        "model.expert_hidden=[16, 8]",
        "training.epochs=1",
    ]
    cfg = load_config(DEFAULT_CONFIG, overrides)
    start = [a.detach().clone() for a in _stitch_units(cfg)]
    res = train(cfg, progress=False, export=True)
    assert set(res.metrics) == set(cfg.task_names) and res.gate_utilisation is None
    assert res.model.columns is not None
    moved = [
        (a.detach() - a0).abs().max().item()
        for a, a0 in zip(res.model.columns.units, start, strict=True)
    ]
    assert min(moved) > 0  # the units were trained with the rest
    assert res.artifact is not None
    art = load_artifact(res.artifact)
    x_cat = torch.randint(0, 2, (5, sum(art.encoder.cat_widths)))
    x_num = torch.randn(5, len(art.encoder.numeric))
    a, b = art.model(x_cat, x_num), res.model.eval()(x_cat, x_num)
    assert all(torch.allclose(a[k], b[k]) for k in a)


def _stitch_units(cfg) -> list[torch.Tensor]:  # noqa: ANN001
    from ranker.cross_stitch import stitch_init

    n = len(cfg.model.expert_hidden)
    return [stitch_init(len(cfg.tasks), cfg.model.stitch_self)] * n


def test_dselect_entropy_regulariser_reaches_training(tiny_world: Path, tmp_path: Path) -> None:
    """Two runs from the same seed, without and with the entropy term: the term is logged, it
    is in the step (the regularised selectors end with lower entropy on validation rows), and the
    gates' utilisation is a distribution per task."""
    from ranker.dselect import DSelectGateBank

    entropy: dict[float, float] = {}
    for weight in (0.0, 0.5):
        run = tmp_path / f"w{weight}"
        overrides = [
            *tiny_overrides(tiny_world, run),
            "model.num_experts=4",
            'model.gate="dselect_k"',
            "model.dselect_k=2",
            f"model.dselect_entropy={weight}",
            "training.epochs=1",
        ]
        cfg = load_config(DEFAULT_CONFIG, overrides)
        res = train(cfg, progress=False, export=False)
        assert res.gate_utilisation is not None
        for row in res.gate_utilisation.values():
            assert abs(sum(row.values()) - 1) < 1e-6
        lines = (run / "run" / "train_log.jsonl").read_text().split("\n")
        steps = [json.loads(x) for x in lines if x and '"step"' in x]
        logged = [r["regulariser"] for r in steps if "regulariser" in r]
        assert (len(logged) > 0) == (weight > 0)
        gate = res.model.dselect
        assert isinstance(gate, DSelectGateBank)
        x_cat = torch.randint(0, 3, (512, sum(res.encoder.cat_widths)))
        x_num = torch.randn(512, len(res.encoder.numeric))
        with torch.no_grad():
            entropy[weight] = gate.selector_entropy(res.model.embed(x_cat, x_num)).item()
    assert entropy[0.5] < 0.9 * entropy[0.0], entropy
