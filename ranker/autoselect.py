"""``auto``: the fastest scoring engine that is accurate enough, chosen on the machine it runs on.

Which engine is fastest depends on the CPU: the same commit and model measured ONNX Runtime
fastest in fp32 on an AMD EPYC, bf16 expert layers 1.5-1.6x faster than fp32 on a Xeon with AMX,
and int8 about as fast there but with 26-41x larger errors (docs/performance.md). Flags alone
cannot rank them, so at start-up (and on every reload) the service:

1. builds the candidate engines the CPU makes worth trying (:func:`candidate_engines`): the fp32
   ones everywhere, ``bf16`` where the CPU has bf16 dot products, ``onnx-int8`` where it has VNNI;
2. runs each on the artifact's sample requests (:mod:`ranker.samples`) and holds its served
   predictions and ranking score to fp32 eager's with the artifact's :class:`EngineGuard`
   (max error per head, Spearman of the ranking score per request, top-k overlap); an engine that
   misses any bound, raises, or returns a non-finite value is refused, never served;
3. times the admitted engines on the same requests, interleaved (every round runs each engine
   once over all requests, so a noisy neighbour slows them alike), and serves the lowest median.

Eager fp32 is the reference, is always admitted, and is what serves when nothing else is
faster. An artifact without sample requests (exported before they were stored) is timed on its
own encoder's default rows, and only exact (fp32) engines are tried on it: without real inputs
there is nothing to hold an approximate engine's accuracy to.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
from scipy.stats import spearmanr

from ranker.config import EngineGuard, TaskSpec
from ranker.cpu import CpuFeatures, cpu_features
from ranker.features import Encoded
from ranker.model import RankingModel
from ranker.modules import ColumnSplit
from ranker.predictor import Predictor
from ranker.samples import SampleRequests

log = logging.getLogger("ranker.autoselect")

EXACT_ENGINES = ("eager", "torchscript", "onnx")
REFERENCE = "eager"

# served predictions of one request -> its ranking score (n,)
ScoreFn = Callable[[dict[str, np.ndarray]], np.ndarray]
PredictorFactory = Callable[[str], Predictor]


def candidate_engines(features: CpuFeatures, approximate: bool = True) -> list[str]:
    """The engines worth timing on a CPU with ``features``; ``approximate=False`` keeps only
    the exact fp32 ones. bf16 without bf16 dot products (AVX2 only) is emulated and slower than
    fp32; int8 without VNNI widens to int16 and gains little."""
    engines = list(EXACT_ENGINES)
    if approximate and features.bf16:
        engines.append("bf16")
    if approximate and features.vnni:
        engines.append("onnx-int8")
    return engines


@dataclass
class EngineTrial:
    """What one engine did on the sample requests."""

    engine: str
    admitted: bool = False
    reason: str = ""  # why it was refused ("" when admitted)
    max_error: dict[str, float] = field(default_factory=dict)  # task -> scaled error
    spearman: float | None = None  # lowest over the requests
    topk_overlap: float | None = None  # mean over the requests
    ms: float | None = None  # median forward time of one request, admitted engines only

    def line(self) -> str:
        err = max(self.max_error.values()) if self.max_error else float("nan")
        acc = (
            f"max error {err:.1e}, spearman {self.spearman:.6f}, top-k {self.topk_overlap:.3f}"
            if self.spearman is not None
            else "accuracy not measured"
        )
        speed = f"{self.ms:.2f} ms" if self.ms is not None else "not timed"
        verdict = "admitted" if self.admitted else f"refused: {self.reason}"
        return f"{self.engine}: {speed}, {acc}, {verdict}"


@dataclass
class Selection:
    """The engine ``auto`` serves and the evidence for it."""

    engine: str
    ms: float | None
    trials: list[EngineTrial]
    features: str
    requests: int
    candidates: int
    threads: int

    def summary(self) -> str:
        ms = f"{self.ms:.2f} ms" if self.ms is not None else "untimed"
        head = (
            f"engine {self.engine} ({ms} per {self.candidates}-candidate request, "
            f"{self.threads} thread(s); CPU: {self.features}; {self.requests} sample requests)"
        )
        return head + "; " + "; ".join(t.line() for t in self.trials)

    def as_json(self) -> dict:
        """Plain JSON (for ``/readyz``): a non-finite figure (a Spearman correlation of an engine
        whose scores were constant) becomes ``null``, which strict JSON encoders accept."""
        return _finite(
            {
                "engine": self.engine,
                "ms": self.ms,
                "cpu": self.features,
                "threads": self.threads,
                "sample_requests": self.requests,
                "candidates": self.candidates,
                "trials": [dict(t.__dict__) for t in self.trials],
            }
        )


def _finite(value: object) -> object:
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return value


def default_requests(model: RankingModel, rows: int = 500, count: int = 4) -> SampleRequests:
    """Stand-in requests for an artifact without samples: every code 0 (unknown), numerics 0;
    good for timing exact engines (their speed does not depend on the values), nothing more."""
    cat = np.zeros((count, rows, model.num_cat_columns), np.int64)
    num = np.zeros((count, rows, model.embed.num_numeric), np.float32)
    return SampleRequests(cat, num)


def score_agreement(s_ref: np.ndarray, s_out: np.ndarray, k: int) -> tuple[float, float]:
    """How alike two rankings of the same candidates are: the Spearman correlation of their
    scores (1.0 for identical constant scores, which have no rank correlation at all), and the
    share of ``s_ref``'s top ``k`` in ``s_out``'s (ties broken by position, as served)."""
    rho = spearmanr(s_ref, s_out).statistic if len(s_ref) > 1 else 1.0
    rho = 1.0 if math.isnan(rho) and np.array_equal(s_ref, s_out) else float(rho)
    k = min(k, len(s_ref))
    if k == 0:
        return rho, 1.0
    top_ref = set(np.argsort(-s_ref, kind="stable")[:k].tolist())
    top_out = set(np.argsort(-s_out, kind="stable")[:k].tolist())
    return rho, len(top_ref & top_out) / k


def _accuracy(
    trial: EngineTrial,
    outputs: list[dict[str, np.ndarray]],
    reference: list[dict[str, np.ndarray]],
    score: ScoreFn,
    guard: EngineGuard,
) -> None:
    """Fills ``trial``'s accuracy and refuses it where it misses ``guard``."""
    errors: dict[str, float] = {}
    spearman: list[float] = []
    overlap: list[float] = []
    for out, ref in zip(outputs, reference, strict=True):
        for task, r in ref.items():
            o = out[task]
            if o.shape != r.shape or not np.isfinite(o).all():
                trial.reason = f"{task}: shape {o.shape} or non-finite values"
                return
            scale = max(1.0, float(np.abs(r).max(initial=0.0)))
            errors[task] = max(errors.get(task, 0.0), float(np.abs(o - r).max()) / scale)
        s_ref, s_out = score(ref), score(out)
        if not np.isfinite(s_out).all():
            trial.reason = "ranking score: non-finite values"
            return
        rho, top = score_agreement(s_ref, s_out, guard.top_k)
        spearman.append(rho)
        overlap.append(top)
    trial.max_error = errors
    trial.spearman = min(spearman) if spearman else 1.0
    trial.topk_overlap = float(np.mean(overlap)) if overlap else 1.0
    bad = [t for t, e in errors.items() if not e <= guard.max_error_for(t)]
    if bad:
        t = bad[0]
        trial.reason = f"{t} error {errors[t]:.1e} > {guard.max_error_for(t):.1e}"
    elif not trial.spearman >= guard.min_spearman:
        trial.reason = f"spearman {trial.spearman:.6f} < {guard.min_spearman}"
    elif not trial.topk_overlap >= guard.min_topk_overlap:
        trial.reason = (
            f"top-{guard.top_k} overlap {trial.topk_overlap:.3f} < {guard.min_topk_overlap}"
        )
    else:
        trial.admitted = True


def _time(predictors: dict[str, Predictor], requests: list[Encoded], rounds: int) -> dict:
    """Median seconds per request of each predictor, the engines interleaved round by round."""
    times: dict[str, list[float]] = {name: [] for name in predictors}
    for _ in range(rounds):
        for name, p in predictors.items():
            for r in requests:
                t0 = time.perf_counter()
                p.predict(r)
                times[name].append(time.perf_counter() - t0)
    return {name: float(np.median(ts)) for name, ts in times.items()}


def select_engine(
    build: PredictorFactory,
    samples: SampleRequests | None,
    score: ScoreFn,
    guard: EngineGuard,
    engines: list[str] | None = None,
    model: RankingModel | None = None,
    rounds: int = 3,
    threads: int = 1,
    timed_requests: int = 8,
) -> tuple[Predictor, Selection]:
    """Builds, checks and times ``engines`` (default: :func:`candidate_engines` for this CPU)
    with ``build(engine)``; returns the fastest admitted one's predictor and the evidence.

    ``samples=None`` (an old artifact): :func:`default_requests` of ``model``, exact engines
    only. An engine that fails to build is refused with the error as its reason. Accuracy is
    checked on every sample request; speed is timed on the first ``timed_requests`` of them,
    ``rounds`` times (24 timed passes per engine by default: a median, not a benchmark)."""
    features = cpu_features()
    if samples is None:
        if model is None:
            raise ValueError("select_engine needs the model when there are no sample requests")
        samples = default_requests(model)
        allowed = set(EXACT_ENGINES)
    else:
        allowed = None
    names = list(dict.fromkeys([REFERENCE, *(engines or candidate_engines(features))]))
    if allowed is not None:
        names = [n for n in names if n in allowed]
    requests = [samples.request(i) for i in range(len(samples))]
    reference_p = build(REFERENCE)
    reference = [reference_p.predict(r) for r in requests]
    trials = [EngineTrial(REFERENCE, admitted=True)]
    trials[0].max_error = {t: 0.0 for t in reference[0]}
    trials[0].spearman, trials[0].topk_overlap = 1.0, 1.0
    admitted: dict[str, Predictor] = {REFERENCE: reference_p}
    for name in names[1:]:
        trial = EngineTrial(name)
        trials.append(trial)
        try:
            p = build(name)
            outputs = [p.predict(r) for r in requests]
        except Exception as e:  # noqa: BLE001 - an engine that cannot run is refused, not fatal
            trial.reason = f"{type(e).__name__}: {e}"
            continue
        _accuracy(trial, outputs, reference, score, guard)
        if trial.admitted:
            admitted[name] = p
    medians = _time(admitted, requests[:timed_requests], rounds)
    for trial in trials:
        if trial.engine in medians:
            trial.ms = medians[trial.engine] * 1e3
    best = min(medians, key=lambda n: medians[n])
    selection = Selection(
        best,
        medians[best] * 1e3,
        trials,
        features.summary(),
        len(requests),
        samples.candidates,
        threads,
    )
    return admitted[best], selection


def auto_predictor(
    model: RankingModel,
    tasks: list[TaskSpec],
    split: ColumnSplit | None,
    samples: SampleRequests | None,
    score: ScoreFn,
    guard: EngineGuard,
    threads: int,
    engines: list[str] | None = None,
) -> tuple[Predictor, Selection]:
    """:func:`select_engine` over the artifact's model, each engine with ``threads`` threads."""

    def build(engine: str) -> Predictor:
        return Predictor(model, tasks, engine, threads, split)

    predictor, selection = select_engine(
        build, samples, score, guard, engines, model=model, threads=threads
    )
    log.info("auto backend: %s", selection.summary())
    return predictor, selection
