"""Every architecture (shared-bottom, OMoE, MMoE, PLE/CGC, cross-stitch; softmax and DSelect-k
gates) on the same contract: output shapes,
gates that are distributions, experts that start different, gate dropout in training only, the
shared parameters every task reaches, and config errors that name the key."""

import pytest
import torch

from ranker.config import ModelConfig, load_config, parse_config
from ranker.errors import ConfigError
from ranker.model import RankingModel
from ranker.modules import FeatureEmbedding, gate_softmax
from tests.conftest import DEFAULT_CONFIG

TASKS = ["click", "watch_time", "like"]
ARCHS = ["shared_bottom", "omoe", "mmoe", "ple", "cross_stitch"]
DSELECT = {"gate": "dselect_k", "dselect_k": 2}
# (architecture, extra settings): every architecture, and every gated one with DSelect-k gates
VARIANTS = [(a, {}) for a in ARCHS] + [(a, DSELECT) for a in ("omoe", "mmoe", "ple")]


def model(arch: str, **kw: object) -> RankingModel:
    cfg = ModelConfig(
        architecture=arch,  # type: ignore[arg-type]
        num_experts=3,
        task_experts=2,
        shared_experts=2,
        expert_hidden=[8, 4],
        tower_hidden=[4],
        embedding_dim=3,
        **kw,  # type: ignore[arg-type]
    )
    return RankingModel([5, 7, 4], 2, TASKS, cfg, cat_widths=[1, 1, 3])


def inputs(b: int = 6) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, 4, (b, 5), generator=g), torch.randn(b, 2, generator=g)


@pytest.mark.parametrize(
    ("arch", "levels", "extra"),
    [(a, 1, kw) for a, kw in VARIANTS] + [("ple", 2, {}), ("ple", 2, DSELECT)],
)
def test_each_architecture_gives_one_value_per_row_and_gates_that_sum_to_one(
    arch: str, levels: int, extra: dict[str, object]
) -> None:
    m = model(arch, ple_levels=levels, **extra)
    out = m.forward_detailed(*inputs())
    assert list(out.raw) == TASKS and all(v.shape == (6,) for v in out.raw.values())
    names = m.expert_names()
    rep_experts = {"shared_bottom": 1, "omoe": 3, "mmoe": 3, "ple": 2, "cross_stitch": 3}[arch]
    assert out.representation.shape == (6, rep_experts, 4)
    if arch == "shared_bottom":
        assert out.gates is None and names == ["bottom"]
        return
    if arch == "cross_stitch":  # no gates; the representation's columns are the tasks'
        assert out.gates is None and names == TASKS
        return
    assert out.gates is not None and out.gates.shape == (6, len(TASKS), len(names))
    assert torch.allclose(out.gates.sum(-1), torch.ones(6, len(TASKS)), atol=1e-5)
    assert (out.gates >= 0).all()
    if arch == "ple":  # a task's gate sees its own and the shared experts only
        assert names == [f"{t}.{i}" for t in TASKS for i in (0, 1)] + ["shared.0", "shared.1"]
        assert (out.gates[:, 0, 2:6] == 0).all() and (out.gates[:, 0, [0, 1, 6, 7]] > 0).all()


def test_ple_experts_start_different() -> None:
    m = model("ple", ple_levels=2)
    for lvl in m.levels:
        for bank in (lvl.task_bank, lvl.shared_bank):
            w = bank.weights[0]
            for i in range(w.shape[0]):
                for j in range(i + 1, w.shape[0]):
                    assert not torch.allclose(w[i], w[j])
        assert not torch.allclose(lvl.task_bank.weights[0][0], lvl.shared_bank.weights[0][0])


@pytest.mark.parametrize(("arch", "extra"), VARIANTS)
def test_shared_parameters_are_exactly_those_every_task_reaches(
    arch: str, extra: dict[str, object]
) -> None:
    m = model(arch, ple_levels=2, **extra)
    cat, num = inputs()
    reached: list[set[int]] = []
    for t in TASKS:
        m.zero_grad(set_to_none=True)
        m(cat, num)[t].sum().backward()
        reached.append({id(p) for p in m.parameters() if p.grad is not None})
    # Per-task gates, and PLE's last-level task experts, are fused into one tensor with a slice
    # per task: every task reaches the tensor, not the slices.
    per_task = [*(m.gate.parameters() if m.gate is not None and m.n_gates > 1 else [])]
    per_task += [*(m.dselect.parameters() if m.dselect is not None and m.n_gates > 1 else [])]
    # cross-stitch: row i of the last unit is read by task i only
    per_task += [m.columns.units[-1]] if m.columns is not None else []
    per_task += [p for lvl in m.levels for p in lvl.task_gates.parameters()]
    per_task += [p for lvl in m.levels[-1:] for p in lvl.task_bank.parameters()]
    every = set.intersection(*reached) - {id(p) for p in per_task}
    assert {id(p) for p in m.shared_parameters()} == every


@pytest.mark.parametrize("arch", ["omoe", "mmoe", "ple"])
def test_gate_dropout_acts_in_training_only(arch: str) -> None:
    m = model(arch, gate_dropout=0.5)
    cat, num = inputs(64)
    m.eval()
    a, b = m.forward_detailed(cat, num), m.forward_detailed(cat, num)
    assert a.gates is not None and b.gates is not None
    assert torch.equal(a.gates, b.gates) and (a.gates[:, :, :] >= 0).all()
    m.train()
    torch.manual_seed(0)
    g = m.forward_detailed(cat, num).gates
    assert g is not None
    assert torch.allclose(g.sum(-1), torch.ones(64, len(TASKS)), atol=1e-5)
    visible = a.gates > 0
    assert (g[visible] == 0).any()  # some experts dropped ...
    assert ((g > 0).sum(-1) >= 1).all()  # ... never all of a gate's


def test_gate_softmax_renormalises_what_is_left() -> None:
    logits = torch.zeros(20000, 4)
    torch.manual_seed(1)
    g = gate_softmax(logits, 0.25, training=True)
    kept = (g > 0).sum(-1)
    assert torch.allclose(g.sum(-1), torch.ones(20000))
    assert torch.allclose(g[kept == 2].max(-1).values, torch.full(((kept == 2).sum(),), 0.5))
    assert abs((g == 0).float().mean().item() - 0.25) < 0.01
    assert torch.equal(gate_softmax(logits, 0.25, training=False), torch.full((20000, 4), 0.25))


def test_multi_valued_embedding_is_the_mean_of_known_values_without_padding() -> None:
    emb = FeatureEmbedding([4, 6], 1, 2, widths=[1, 3])
    with torch.no_grad():
        emb.table.weight.copy_(torch.arange(20, dtype=torch.float32).view(10, 2))
    cat = torch.tensor([[1, 2, 5, 0], [3, 0, 0, 0], [0, 1, 1, 1]])
    out = emb(cat, torch.zeros(3, 1))  # (3, 2*2 + 1)
    rows = emb.table.weight  # feature 0: rows 0..3, feature 1: rows 4..9
    assert torch.equal(out[0, :2], rows[1])
    assert torch.allclose(out[0, 2:4], (rows[4 + 2] + rows[4 + 5]) / 2)  # padding 0 left out
    assert torch.equal(out[1, 2:4], rows[4 + 0])  # nothing known: the unknown embedding
    assert torch.equal(out[2, :2], rows[0]) and torch.equal(out[2, 2:4], rows[4 + 1])


def test_bad_ple_setting_is_refused_naming_the_key() -> None:
    with pytest.raises(ConfigError, match=r"model\.shared_experts: architecture 'ple' needs"):
        load_config(DEFAULT_CONFIG, ['model.architecture="ple"', "model.shared_experts=0"])
    with pytest.raises(ConfigError, match=r"model\.ple_levels"):
        load_config(DEFAULT_CONFIG, ['model.architecture="ple"', "model.ple_levels=0"])
    with pytest.raises(ConfigError, match=r"model\.gate_dropout"):
        load_config(DEFAULT_CONFIG, ["model.gate_dropout=1.0"])


@pytest.mark.parametrize(
    ("sets", "message"),
    [
        (
            ['model.gate="dselect_k"', "model.num_experts=3", "model.dselect_k=4"],
            r"model\.dselect_k: .*k = 4 is more than the 3 experts a gate sees",
        ),
        (
            [
                'model.architecture="ple"',
                "model.task_experts=1",
                "model.shared_experts=1",
                'model.gate="dselect_k"',
                "model.dselect_k=3",
            ],
            r"model\.dselect_k: .*k = 3 is more than the 2 experts",
        ),
        (
            ['model.gate="dselect_k"', "model.dselect_k=0"],
            r"model\.dselect_k: Input should be greater than or equal to 1",
        ),
        (
            ['model.gate="dselect_k"', "model.dselect_gamma=0"],
            r"model\.dselect_gamma: Input should be greater than 0",
        ),
        (
            ['model.gate="dselect_k"', "model.dselect_entropy=-1"],
            r"model\.dselect_entropy: Input should be greater than or equal",
        ),
        (['model.gate="top2"'], r"model\.gate: Input should be 'softmax' or 'dselect_k'"),
        (
            ['model.architecture="shared_bottom"', 'model.gate="dselect_k"'],
            r"model\.gate: .*'shared_bottom' has no gates",
        ),
        (
            ['model.architecture="cross_stitch"', 'model.gate="dselect_k"'],
            r"model\.gate: .*'cross_stitch' has no gates",
        ),
        (["model.gate_dropout=0.1", 'model.gate="dselect_k"'], r"model\.gate: .*does not take it"),
        (
            ['model.architecture="cross_stitch"', "model.stitch_self=0"],
            r"model\.stitch_self: Input should be greater than 0",
        ),
        (
            ['model.architecture="cross_stitch"', "model.stitch_self=1.5"],
            r"model\.stitch_self: Input should be less than or equal to 1",
        ),
    ],
)
def test_bad_cross_stitch_or_dselect_setting_is_refused_naming_the_key(
    sets: list[str], message: str
) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config(DEFAULT_CONFIG, sets)


def test_new_settings_round_trip_through_json() -> None:
    for sets in (
        ['model.architecture="cross_stitch"', "model.stitch_self=0.8"],
        ['model.architecture="ple"', 'model.gate="dselect_k"', "model.dselect_gamma=2.0"],
    ):
        cfg = load_config(DEFAULT_CONFIG, sets)
        assert parse_config(cfg.model_dump(mode="json")).model == cfg.model


def test_ple_config_round_trips_through_json() -> None:
    cfg = load_config(DEFAULT_CONFIG, ['model.architecture="ple"', "model.ple_levels=2"])
    again = parse_config(cfg.model_dump(mode="json"))
    assert again.model == cfg.model
