"""``auto`` serves the fastest engine that passes the artifact's accuracy guard, and never one
that fails it (``ranker/autoselect.py``); the sample requests it runs on are stored at export
(``ranker/samples.py``, ``training/samples.py``).

The fake engines below are the eager predictor with its scorer wrapped: made slower (a sleep),
or made wrong on purpose (a shift, noise, NaN, an exception), so each test knows which engine
is fastest and which is accurate, and checks that ``auto`` picks by both."""

from __future__ import annotations

import copy
import json
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from ranker.artifact import load_artifact, save_artifact
from ranker.autoselect import EXACT_ENGINES, candidate_engines, select_engine
from ranker.config import EngineGuard
from ranker.cpu import CpuFeatures
from ranker.errors import ArtifactError
from ranker.predictor import Predictor, request_split
from ranker.samples import SAMPLES_FILE
from ranker.scoring import RankingFormula, load_ranking_config
from tests.conftest import RANKING_CONFIG


@pytest.fixture(scope="module")
def loaded(tiny_artifact: Path):  # noqa: ANN201 - Artifact
    return load_artifact(tiny_artifact)


@pytest.fixture(scope="module")
def score(loaded):  # noqa: ANN001, ANN201
    return RankingFormula(load_ranking_config(RANKING_CONFIG), loaded.config.task_names).score


def _factory(loaded, slow_s: float = 0.003):  # noqa: ANN001, ANN202
    """Engines by name: ``eager`` (slowed by ``slow_s`` per call), ``right`` (eager, fast),
    ``wrong`` (click logits shifted, fast), ``noisy`` (every logit plus N(0, 0.3), fast),
    ``nan``, ``constant`` (every logit 0), ``broken`` (raises at build)."""
    split = request_split(loaded.model, loaded.encoder)
    rng = np.random.default_rng(0)

    def build(engine: str) -> Predictor:
        if engine == "broken":
            raise RuntimeError("this engine cannot be built here")
        p = Predictor(loaded.model, loaded.config.tasks, "eager", 1, split)
        base = p.scorer

        def scorer(cat: np.ndarray, num: np.ndarray) -> dict[str, torch.Tensor]:
            raw = base(cat, num)
            if engine == "eager":
                time.sleep(slow_s)
            elif engine == "wrong":
                raw = dict(raw, click=raw["click"] + 0.5)
            elif engine == "noisy":
                raw = {
                    t: v + torch.from_numpy(rng.normal(0, 0.3, v.shape).astype(np.float32))
                    for t, v in raw.items()
                }
            elif engine == "nan":
                raw = dict(raw, like=raw["like"] * float("nan"))
            elif engine == "constant":
                raw = {t: torch.zeros_like(v) for t, v in raw.items()}
            return raw

        p.scorer = scorer
        p.backend = engine
        return p

    return build


def _trial(selection, engine: str):  # noqa: ANN001, ANN202
    return next(t for t in selection.trials if t.engine == engine)


def test_a_fast_wrong_engine_is_never_served(loaded, score) -> None:  # noqa: ANN001
    """The wrong engine is the fastest by far; the guard refuses it and eager serves."""
    p, sel = select_engine(
        _factory(loaded), loaded.samples, score, EngineGuard(), ["wrong"], rounds=2
    )
    assert sel.engine == p.backend == "eager"
    wrong = _trial(sel, "wrong")
    assert not wrong.admitted and wrong.ms is None
    assert wrong.reason.startswith("click error")
    assert wrong.max_error["click"] > EngineGuard().max_error


def test_the_fastest_admitted_engine_is_served(loaded, score) -> None:  # noqa: ANN001
    p, sel = select_engine(
        _factory(loaded), loaded.samples, score, EngineGuard(), ["wrong", "right"], rounds=2
    )
    assert sel.engine == p.backend == "right"
    right, eager = _trial(sel, "right"), _trial(sel, "eager")
    assert right.admitted and right.max_error == {t: 0.0 for t in loaded.config.task_names}
    assert right.ms < eager.ms
    assert not _trial(sel, "wrong").admitted


@pytest.mark.parametrize(
    ("guard", "reason"),
    [
        (EngineGuard(max_error=1e-6, min_spearman=-1, min_topk_overlap=0), "error"),
        (EngineGuard(max_error=1e9, min_spearman=0.9999, min_topk_overlap=0), "spearman"),
        (EngineGuard(max_error=1e9, min_spearman=-1, min_topk_overlap=0.999), "overlap"),
    ],
)
def test_every_bound_of_the_guard_refuses_on_its_own(
    loaded,  # noqa: ANN001
    score,  # noqa: ANN001
    guard: EngineGuard,
    reason: str,
) -> None:
    """Noise moves the errors, the rank correlation and the top-k at once: each bound, alone
    tight and the others open, must be enough to refuse the engine."""
    _, sel = select_engine(_factory(loaded), loaded.samples, score, guard, ["noisy"], rounds=1)
    noisy = _trial(sel, "noisy")
    assert sel.engine == "eager"
    assert not noisy.admitted and reason in noisy.reason


def test_with_every_bound_open_the_noisy_engine_is_fastest_and_served(loaded, score) -> None:  # noqa: ANN001
    """The control for the test above: the same engine, the guard open, is admitted."""
    guard = EngineGuard(max_error=1e9, min_spearman=-1, min_topk_overlap=0)
    _, sel = select_engine(_factory(loaded), loaded.samples, score, guard, ["noisy"], rounds=2)
    assert sel.engine == "noisy"
    noisy = _trial(sel, "noisy")
    assert noisy.spearman < 0.9999 and noisy.topk_overlap < 0.999


def test_non_finite_or_broken_engines_are_refused(loaded, score) -> None:  # noqa: ANN001
    guard = EngineGuard(max_error=1e9, min_spearman=-1, min_topk_overlap=0)
    _, sel = select_engine(
        _factory(loaded), loaded.samples, score, guard, ["nan", "broken", "constant"], rounds=1
    )
    assert sel.engine == "eager"
    assert "non-finite" in _trial(sel, "nan").reason
    assert "cannot be built" in _trial(sel, "broken").reason
    # constant scores: no rank correlation at all (NaN), refused even by an open guard
    constant = _trial(sel, "constant")
    assert not constant.admitted and "spearman" in constant.reason
    json.dumps(sel.as_json(), allow_nan=False)  # /readyz encodes it strictly


def test_real_engines_on_this_cpu(loaded, score) -> None:  # noqa: ANN001
    """Every candidate engine of this CPU is tried; whichever wins, its predictions on the
    sample requests are within the guard of eager's (the bf16 engine included where tried)."""
    from ranker.autoselect import auto_predictor

    split = request_split(loaded.model, loaded.encoder)
    guard = loaded.config.export.guard
    p, sel = auto_predictor(
        loaded.model, loaded.config.tasks, split, loaded.samples, score, guard, threads=1
    )
    tried = [t.engine for t in sel.trials]
    from ranker.cpu import cpu_features

    assert tried == list(dict.fromkeys(["eager", *candidate_engines(cpu_features())]))
    assert p.backend == sel.engine and _trial(sel, sel.engine).admitted
    eager = Predictor(loaded.model, loaded.config.tasks, "eager", 1, split)
    for i in range(len(loaded.samples)):
        rows = loaded.samples.request(i)
        ref, got = eager.predict(rows), p.predict(rows)
        for task in ref:
            scale = max(1.0, float(np.abs(ref[task]).max()))
            assert np.abs(got[task] - ref[task]).max() / scale <= guard.max_error_for(task)


def test_a_deliberately_wrong_bf16_engine_is_refused_end_to_end(
    loaded,  # noqa: ANN001
    tiny_artifact: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The service's own path (``make_predictor`` with ``RANKER_BACKEND=auto``) on a CPU that
    claims bf16 units, with the bf16 engine's expert weights scaled by 1.5: tried, refused."""
    import ranker.autoselect
    import ranker.backends
    from service.engine import make_predictor
    from service.settings import Settings

    real = ranker.backends.bf16_experts

    def off(model):  # noqa: ANN001, ANN202
        twin = real(model)
        with torch.no_grad():
            for name, prm in twin.named_parameters():
                if ".weights." in name:
                    prm.mul_(1.5)
        return twin

    monkeypatch.setattr(ranker.backends, "bf16_experts", off)
    monkeypatch.setattr(
        ranker.autoselect, "cpu_features", lambda: CpuFeatures(frozenset({"avx512_bf16"}))
    )
    settings = Settings(artifact=tiny_artifact, backend="auto", ranking_config=RANKING_CONFIG)
    p = make_predictor(loaded, settings)
    bf16 = _trial(p.selection, "bf16")
    assert not bf16.admitted and bf16.reason
    assert p.backend != "bf16" and p.backend in EXACT_ENGINES


def test_candidates_follow_the_cpu() -> None:
    avx2 = CpuFeatures(frozenset({"avx2"}))
    amx = CpuFeatures(frozenset({"avx2", "avx512f", "avx512_vnni", "amx_bf16", "amx_int8"}))
    assert candidate_engines(avx2) == ["eager", "torchscript", "onnx"]
    assert candidate_engines(amx) == ["eager", "torchscript", "onnx", "bf16", "onnx-int8"]
    assert candidate_engines(amx, approximate=False) == list(EXACT_ENGINES)


def test_sample_requests_are_stored_at_export_as_the_service_encodes_requests(loaded) -> None:  # noqa: ANN001
    """One user and one context per request (their columns equal on every row), real videos
    of the videos table beside them."""
    from ranker.tables import FeatureTable

    s = loaded.samples
    e = loaded.config.export
    assert s is not None and s.cat.shape[:2] == (e.sample_requests, e.sample_candidates)
    assert SAMPLES_FILE in loaded.manifest["files"]
    enc, d = loaded.encoder, loaded.config.data
    start, video_cols, shared_cols = 0, [], []
    for f in enc.categorical:
        (video_cols if f.source == "video" else shared_cols).extend(range(start, start + f.width))
        start += f.width
    for r in range(len(s)):
        assert (s.cat[r, :, shared_cols] == s.cat[r, :1, shared_cols]).all()
    users = {tuple(row) for row in s.cat[:, 0, shared_cols].tolist()}
    assert len(users) > 1  # different requests, not one repeated
    videos = FeatureTable.from_parquet(d.videos, d.video_key, enc, "video")
    table_rows = {tuple(row) for row in videos.rows.cat.tolist()}
    assert video_cols
    got = {tuple(row) for row in s.cat[:, :, video_cols].reshape(-1, len(video_cols)).tolist()}
    assert got <= table_rows and len(got) > 10


def test_without_samples_only_exact_engines_are_tried(loaded, score, tmp_path: Path) -> None:  # noqa: ANN001
    """An artifact exported before samples were stored: no real inputs to hold an approximate
    engine to, so only exact ones are timed."""
    path = save_artifact(loaded.model, loaded.encoder, loaded.config, root=tmp_path)
    old = load_artifact(path)
    assert old.samples is None and SAMPLES_FILE not in old.manifest["files"]
    _, sel = select_engine(
        _factory(loaded), None, score, EngineGuard(), ["wrong", "right"], model=old.model, rounds=1
    )
    assert [t.engine for t in sel.trials] == ["eager"]


def test_tampered_samples_are_refused(loaded, tmp_path: Path) -> None:  # noqa: ANN001
    path = save_artifact(
        loaded.model, loaded.encoder, loaded.config, root=tmp_path, samples=loaded.samples
    )
    s = copy.deepcopy(loaded.samples)
    s.num[0, 0, 0] += 1.0
    s.save(path / SAMPLES_FILE)
    with pytest.raises(ArtifactError, match="checksum mismatch for samples"):
        load_artifact(path)
