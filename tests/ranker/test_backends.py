"""Every scoring backend serves what eager PyTorch serves (``ranker/backends.py``).

Tolerances, on the tiny trained artifact and real encoded rows of its log:

* ``torchscript`` and ``onnx`` (fp32): every head's served prediction within ``rtol=1e-4,
  atol=1e-5`` of eager (differences are float32 summation order, about 1e-7 in practice), and
  the ranking of a 200-candidate batch under the ranking formula identical to eager's.
* ``onnx-int8`` (dynamic quantisation): not exact by design. Checked: top-50 of 200 overlaps
  eager's top-50 by at least 80%, and Spearman correlation of the scores at least 0.95.
* ``bf16`` (expert layers in bfloat16): not exact by design; held to the artifact's own
  accuracy guard (``export.guard``), as the service's ``auto`` holds it, at every batch size,
  per request and plain. Runs on any CPU (emulated where there are no bf16 units).

The service scores one request at a time with the user's and context's first-layer share
computed once (``request_split``); every backend in that mode is held to the same tolerances
against plain eager on request-shaped rows (one user and one context, 200 videos).

Cross-stitch and DSelect-k gates (mmoe, omoe, two-level ple) are held to the same tolerances,
plain and per request, on models with the tiny artifact's embeddings and towers.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from ranker.artifact import load_artifact
from ranker.backends import BACKENDS, build_scorer
from ranker.features import Encoded
from ranker.predictor import Predictor, request_split
from ranker.scoring import RankingFormula, load_ranking_config
from ranker.tables import FeatureTable
from tests.conftest import RANKING_CONFIG
from training.data import BatchBuilder, ImpressionLog

EXACT = ("torchscript", "onnx")
RTOL, ATOL = 1e-4, 1e-5
INT8_TOP50_OVERLAP = 0.8
INT8_SPEARMAN = 0.95


@pytest.fixture(scope="module")
def loaded(tiny_artifact: Path):  # noqa: ANN201 - Artifact
    return load_artifact(tiny_artifact)


@pytest.fixture(scope="module")
def rows(loaded) -> Encoded:  # noqa: ANN001
    """200 real rows of the validation log, encoded as training and serving encode them."""
    cfg, d = loaded.config, loaded.config.data
    builder = BatchBuilder(
        cfg,
        loaded.encoder,
        FeatureTable.from_parquet(d.users, d.user_key, loaded.encoder, "user"),
        FeatureTable.from_parquet(d.videos, d.video_key, loaded.encoder, "video"),
    )
    for file, rb in ImpressionLog(cfg).record_batches("validation", batch_size=200):
        enc, _, _ = builder.features(rb, file)
        if len(enc) == 200:
            return enc
    pytest.fail("the tiny log has no 200-row validation batch")


@pytest.fixture(scope="module")
def request_rows(loaded, rows: Encoded) -> Encoded:  # noqa: ANN001
    """The 200 rows as one request: row 0's user and context columns on every row."""
    enc = loaded.encoder
    cat, num = rows.cat.copy(), rows.num.copy()
    start = 0
    for f in enc.categorical:
        if f.source != "video":
            cat[:, start : start + f.width] = cat[0, start : start + f.width]
        start += f.width
    for j, f in enumerate(enc.numeric):
        if f.source != "video":
            num[:, j] = num[0, j]
    return Encoded(cat, num)


@pytest.fixture(scope="module")
def formula(loaded) -> RankingFormula:  # noqa: ANN001
    return RankingFormula(load_ranking_config(RANKING_CONFIG), loaded.config.task_names)


def _ranking(scores: np.ndarray) -> np.ndarray:
    return np.argsort(-scores, kind="stable")


@pytest.mark.parametrize("backend", EXACT)
def test_backend_predictions_and_ranking_equal_eager(
    backend: str,
    loaded,  # noqa: ANN001
    rows: Encoded,
    formula: RankingFormula,
) -> None:
    eager = Predictor(loaded.model, loaded.config.tasks).predict(rows)
    other = Predictor(loaded.model, loaded.config.tasks, backend, threads=1).predict(rows)
    assert other.keys() == eager.keys()
    for task in eager:
        assert other[task].shape == eager[task].shape == (200,)
        np.testing.assert_allclose(other[task], eager[task], rtol=RTOL, atol=ATOL, err_msg=task)
    np.testing.assert_array_equal(_ranking(formula.score(other)), _ranking(formula.score(eager)))


@pytest.mark.parametrize("backend", ("eager", *EXACT))
def test_per_request_scoring_equals_plain_eager(
    backend: str,
    loaded,  # noqa: ANN001
    request_rows: Encoded,
    formula: RankingFormula,
) -> None:
    """What the service runs: the request's shared first-layer share computed once."""
    plain = Predictor(loaded.model, loaded.config.tasks).predict(request_rows)
    split = request_split(loaded.model, loaded.encoder)
    assert 0 < len(split.shared) < loaded.model.embed.out_dim
    once = Predictor(loaded.model, loaded.config.tasks, backend, 1, split).predict(request_rows)
    for task in plain:
        np.testing.assert_allclose(once[task], plain[task], rtol=RTOL, atol=ATOL, err_msg=task)
    # Same order but for near-ties (one request's candidates often score within 1e-7 of each
    # other): in the order ``once`` ranks them, eager's scores never rise by more than float noise.
    ranked_plain = formula.score(plain)[_ranking(formula.score(once))]
    assert np.diff(ranked_plain).max() <= 1e-5
    one = request_rows.take(np.arange(1))  # a single candidate
    single = Predictor(loaded.model, loaded.config.tasks, backend, 1, split).predict(one)
    for task in plain:
        np.testing.assert_allclose(single[task], plain[task][:1], rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("backend", EXACT)
@pytest.mark.parametrize("n", [1, 7, 200])
def test_backend_batch_axis_is_dynamic(backend: str, n: int, loaded, rows: Encoded) -> None:  # noqa: ANN001
    """Traced and exported on 8 rows; any batch size must run (one candidate included)."""
    part = rows.take(np.arange(n))
    eager = Predictor(loaded.model, loaded.config.tasks).predict(part)
    other = Predictor(loaded.model, loaded.config.tasks, backend, threads=1).predict(part)
    for task in eager:
        assert other[task].shape == (n,)
        np.testing.assert_allclose(other[task], eager[task], rtol=RTOL, atol=ATOL, err_msg=task)


@pytest.mark.parametrize("per_request", [False, True])
def test_int8_keeps_the_top_of_the_ranking(
    per_request: bool,
    loaded,  # noqa: ANN001
    rows: Encoded,
    request_rows: Encoded,
    formula: RankingFormula,
) -> None:
    split = request_split(loaded.model, loaded.encoder) if per_request else None
    rows = request_rows if per_request else rows
    tasks = loaded.config.tasks
    eager = formula.score(Predictor(loaded.model, tasks).predict(rows))
    int8 = formula.score(Predictor(loaded.model, tasks, "onnx-int8", 1, split).predict(rows))
    top_e, top_q = set(_ranking(eager)[:50]), set(_ranking(int8)[:50])
    assert len(top_e & top_q) / 50 >= INT8_TOP50_OVERLAP
    rank_e, rank_q = np.argsort(np.argsort(eager)), np.argsort(np.argsort(int8))
    assert np.corrcoef(rank_e, rank_q)[0, 1] >= INT8_SPEARMAN


@pytest.mark.parametrize("per_request", [False, True])
@pytest.mark.parametrize("n", [1, 7, 200])
def test_bf16_experts_stay_within_the_artifact_guard(
    per_request: bool,
    n: int,
    loaded,  # noqa: ANN001
    rows: Encoded,
    request_rows: Encoded,
    formula: RankingFormula,
) -> None:
    split = request_split(loaded.model, loaded.encoder) if per_request else None
    part = (request_rows if per_request else rows).take(np.arange(n))
    tasks, guard = loaded.config.tasks, loaded.config.export.guard
    eager = Predictor(loaded.model, tasks).predict(part)
    bf16 = Predictor(loaded.model, tasks, "bf16", 1, split).predict(part)
    for task in eager:
        assert bf16[task].shape == (n,) and bf16[task].dtype == np.float64
        scale = max(1.0, float(np.abs(eager[task]).max()))
        assert np.abs(bf16[task] - eager[task]).max() / scale <= guard.max_error_for(task), task
        assert not np.array_equal(bf16[task], eager[task]), "bf16 must not be fp32 in disguise"
    if n == 200:
        s_e, s_b = formula.score(eager), formula.score(bf16)
        rank_e, rank_b = np.argsort(np.argsort(s_e)), np.argsort(np.argsort(s_b))
        assert np.corrcoef(rank_e, rank_b)[0, 1] >= guard.min_spearman
        top = guard.top_k
        overlap = set(_ranking(s_e)[:top]) & set(_ranking(s_b)[:top])
        assert len(overlap) / top >= guard.min_topk_overlap


def test_bf16_leaves_the_served_model_in_fp32(loaded) -> None:  # noqa: ANN001
    """The bf16 engine works on a copy: the artifact's model (eager's reference) keeps fp32."""
    build_scorer(loaded.model, "bf16")
    assert {p.dtype for p in loaded.model.parameters()} == {torch.float32}


def test_unknown_backend_is_refused(loaded) -> None:  # noqa: ANN001
    with pytest.raises(ValueError, match="unknown scoring backend"):
        build_scorer(loaded.model, "tensorrt")
    assert set(BACKENDS) == {"eager", "torchscript", "onnx", "onnx-int8", "bf16"}


def test_service_setting_selects_the_backend(tiny_artifact: Path) -> None:
    """``RANKER_BACKEND`` reaches the predictor the service builds."""
    from service.engine import make_predictor
    from service.settings import Settings

    a = load_artifact(tiny_artifact)
    settings = Settings(artifact=tiny_artifact, backend="onnx", threads=1)
    assert make_predictor(a, settings).backend == "onnx"
    with pytest.raises(ValueError, match="backend"):
        Settings(artifact=tiny_artifact, backend="tensorrt")


# --- cross-stitch and DSelect-k gates on every backend ------------------------------------------

VARIANTS = {
    "cross_stitch": {"architecture": "cross_stitch"},
    "mmoe+dselect": {"architecture": "mmoe", "num_experts": 3, "gate": "dselect_k"},
    "omoe+dselect": {"architecture": "omoe", "num_experts": 5, "gate": "dselect_k"},
    "ple2+dselect": {
        "architecture": "ple",
        "ple_levels": 2,
        "task_experts": 1,
        "shared_experts": 2,
        "gate": "dselect_k",
    },
}


@pytest.fixture(scope="module", params=list(VARIANTS))
def variant(request, loaded):  # noqa: ANN001, ANN201 - (name, RankingModel)
    """The tiny artifact's embeddings and towers under another architecture, the rest drawn at
    random: cross-stitch units far from identity, DSelect-k selector logits spread so that some
    selectors are binary and some are not (both regimes of the smooth-step get exported)."""
    import torch

    from ranker.artifact import build_model
    from ranker.dselect import DSelectGateBank

    cfg = loaded.config.model_copy(
        update={"model": loaded.config.model.model_copy(update=VARIANTS[request.param])}
    )
    torch.manual_seed(0)
    model = build_model(cfg, loaded.encoder)
    trained = loaded.model.state_dict()
    keep = {k: v for k, v in trained.items() if k.startswith(("embed.", "towers."))}
    model.load_state_dict(keep, strict=False)
    with torch.no_grad():
        if model.columns is not None:
            for alpha in model.columns.units:
                alpha.copy_(torch.eye(len(alpha)) * 0.6 + torch.rand(alpha.shape) * 0.4)
        for m in model.modules():
            if isinstance(m, DSelectGateBank):
                km = m.k * m.m
                m.weight[..., :km].mul_(300.0)
                m.bias[:, :km].mul_(30.0)
    return request.param, model.eval()


def test_new_architectures_score_alike_on_every_backend(
    variant,  # noqa: ANN001
    loaded,  # noqa: ANN001
    rows: Encoded,
    request_rows: Encoded,
    formula: RankingFormula,
) -> None:
    """Every exact backend, plain and per request, within the exact tolerances of eager; int8
    keeps the top of the ranking; the DSelect-k models really mix binary and open selectors."""
    import torch

    from ranker.dselect import DSelectGateBank

    name, model = variant
    tasks = loaded.config.tasks
    if "dselect" in name:
        x = model.embed(torch.from_numpy(rows.cat), torch.from_numpy(rows.num))
        gates = [m for m in model.modules() if isinstance(m, DSelectGateBank)]
        z = gates[0].linear(x)[..., : gates[0].k * gates[0].m]
        binary = (z.abs() >= gates[0].gamma / 2).float().mean().item()
        assert 0.2 < binary < 0.98, binary
    split = request_split(model, loaded.encoder)
    for data, s in ((rows, None), (request_rows, split)):
        eager = Predictor(model, tasks).predict(data)
        for backend in ("eager", *EXACT):
            if backend == "eager" and s is None:
                continue
            other = Predictor(model, tasks, backend, 1, s).predict(data)
            for task in eager:
                np.testing.assert_allclose(
                    other[task], eager[task], rtol=RTOL, atol=ATOL, err_msg=f"{backend} {task}"
                )
        one = data.take(np.arange(1))
        single = Predictor(model, tasks, "onnx", 1, s).predict(one)
        for task in eager:
            np.testing.assert_allclose(single[task], eager[task][:1], rtol=RTOL, atol=ATOL)
        int8 = Predictor(model, tasks, "onnx-int8", 1, s).predict(data)
        top_e = set(_ranking(formula.score(eager))[:50])
        top_q = set(_ranking(formula.score(int8))[:50])
        assert len(top_e & top_q) / 50 >= INT8_TOP50_OVERLAP


@pytest.mark.parametrize("arch", ["mmoe", "omoe", "shared_bottom", "ple", "cross_stitch"])
def test_bf16_runs_every_architecture_close_to_fp32(arch: str) -> None:
    """Every architecture's experts are ExpertBanks: the bf16 engine converts them all (and only
    them) and stays near fp32 on random models and inputs (20 of each)."""
    from ranker.backends import bf16_experts
    from ranker.config import ModelConfig
    from ranker.model import RankingModel
    from ranker.modules import ExpertBank

    for seed in range(20):
        torch.manual_seed(seed)
        cfg = ModelConfig(
            architecture=arch, embedding_dim=4, expert_hidden=[16, 8], tower_hidden=[8]
        )
        model = RankingModel([10, 20, 5], 3, ["a", "b"], cfg).eval()
        twin = bf16_experts(model)
        banks = [m for m in twin.modules() if isinstance(m, ExpertBank)]
        assert banks and all(p.dtype == torch.bfloat16 for b in banks for p in b.parameters())
        others = [p for n, p in twin.named_parameters() if ".bank." not in n]
        assert {p.dtype for p in others} == {torch.float32}  # gates, towers, embeddings
        rng = np.random.default_rng(seed)
        cat = rng.integers(0, 5, (64, 3))
        # standardised numerics, some wider: bf16 keeps 8 bits, so the error grows with them
        num = (rng.standard_normal((64, 3)) * 10 ** rng.uniform(-1, 1)).astype(np.float32)
        ref, got = build_scorer(model, "eager")(cat, num), build_scorer(model, "bf16")(cat, num)
        for task in ref:
            scale = max(1.0, float(ref[task].abs().max()))
            assert float((got[task] - ref[task]).abs().max()) / scale < 5e-2, (arch, seed, task)


def test_bf16_first_expert_layer_is_one_onednn_linear_with_relu() -> None:
    """The bf16 engine's frozen graph runs every expert bank's first layer (an input shared by
    every expert) as oneDNN's linear with relu in its epilogue, not a matmul and then a relu;
    where oneDNN has no bf16 linear (AVX2 only), the bank's own matmul and relu."""
    from ranker.backends import _example, _onednn_bf16, _TupleOutputs, bf16_experts
    from ranker.config import ModelConfig
    from ranker.model import RankingModel

    cfg = ModelConfig(architecture="mmoe", embedding_dim=4, expert_hidden=[16, 8], tower_hidden=[8])
    model = RankingModel([10, 20, 5], 3, ["a", "b"], cfg).eval()
    for split in (None, model.column_split([0], [1])):
        wrapped = _TupleOutputs(bf16_experts(model), split).eval()
        with torch.no_grad():
            traced = torch.jit.trace(wrapped, _example(model), check_trace=False)
            graph = torch.jit.optimize_for_inference(torch.jit.freeze(traced)).graph
        kinds = [n.kind() for n in graph.nodes()]
        fused = _onednn_bf16()
        assert kinds.count("mkldnn::_linear_pointwise") == int(fused)
        # the second expert layer's relu after its baddbmm, and the first's when not fused
        assert kinds.count("aten::relu_") == 2 - int(fused)


@pytest.mark.parametrize(
    ("arch", "gate"),
    [
        ("mmoe", "softmax"),
        ("mmoe", "dselect_k"),
        ("omoe", "softmax"),
        ("shared_bottom", "softmax"),
        ("ple", "dselect_k"),
        ("ple", "softmax"),
        ("cross_stitch", "softmax"),
    ],
)
def test_bf16_fused_first_layer_matches_the_bank(arch: str, gate: str) -> None:
    """The fused first expert layer computes what the bank's own forward computes in bf16, on
    100 random models and inputs per architecture (wide inputs included), plain and per request
    (the shared columns folded into the bias)."""
    from ranker.backends import bf16_experts
    from ranker.config import ModelConfig
    from ranker.model import RankingModel

    worst = 0.0
    for seed in range(100):
        torch.manual_seed(seed)
        rng = np.random.default_rng(seed)
        hidden = [int(rng.integers(1, 40)), int(rng.integers(1, 20))]
        cfg = ModelConfig(
            architecture=arch,
            embedding_dim=int(rng.integers(1, 6)),
            num_experts=int(rng.integers(2, 7)),  # DSelect-k picks k = 2
            expert_hidden=hidden,
            tower_hidden=[8],
            gate=gate,
            ple_levels=int(rng.integers(1, 3)),  # level 2 reads per-expert inputs: not fused
        )
        model = RankingModel([10, 20, 5], 3, ["a", "b"], cfg).eval()
        fused, plain = bf16_experts(model), bf16_experts(model, fuse_relu=False)
        rows = int(rng.integers(1, 80))
        cat = torch.from_numpy(rng.integers(0, 5, (rows, 3)))
        num = torch.from_numpy(
            (rng.standard_normal((rows, 3)) * 10 ** rng.uniform(-2, 2)).astype(np.float32)
        )
        cat[:, 0], num[:, 1] = cat[0, 0], num[0, 1]
        with torch.no_grad():
            for split in (None, model.column_split([0], [1])):
                got, ref = fused(cat, num, split), plain(cat, num, split)
                for task in ref:
                    scale = max(1.0, float(ref[task].abs().max()))
                    err = float((got[task] - ref[task]).abs().max()) / scale
                    worst = max(worst, err)
    assert worst < 2e-2, (arch, gate, worst)
