"""Scoring backends: the same loaded :class:`~ranker.model.RankingModel`, run by different engines.

The service spends most of a request's compute in one forward pass over a few hundred candidates,
and eager PyTorch pays Python and dispatcher overhead per op. A backend turns the eval-mode model
into a faster graph at start-up, from the weights already loaded from ``model.safetensors`` (no
pickle, nothing new in the artifact), so the artifact format is unchanged and ``eager`` stays the
fallback that defines what "correct" means (``tests/ranker/test_backends.py`` checks each backend
against it).

* ``eager``: the model as it is (today's behaviour).
* ``torchscript``: ``torch.jit.trace`` + ``freeze`` + ``optimize_for_inference`` (folds the
  weights into constants and fuses linear + relu).
* ``onnx``: exported with the legacy TorchScript-based exporter (``dynamo=False``: the dynamo
  exporter's graph is slower to build and int8 quantisation fails on it), a dynamic batch axis,
  run by ONNX Runtime from an in-memory model (``InferenceSession(bytes)``), nothing on disk.
* ``onnx-int8``: the ``onnx`` graph with dynamic int8 quantisation of the matmul weights. Faster
  on big models, but not exact: the parity test states what it must keep (top-k overlap).
* ``bf16``: the expert layers (most of the FLOPs) in bfloat16, everything else (embeddings,
  gates, towers, the score) in fp32, traced and frozen as ``torchscript`` is. Where the CPU has
  bf16 matrix units (AMX) torch sends these matmuls to them by itself: 2.7-5.5x the fp32 speed
  per layer on a Xeon, with a max probability error of 5.7e-4 on a trained model
  (docs/performance.md). Keeping the gates and towers in fp32 keeps the softmax over the experts
  and the head logits exact enough that the ranking barely moves; bf16 everywhere moved it.
  The first expert layer runs as oneDNN's linear with relu in its epilogue (:class:`_Bf16Experts`;
  1.03-1.6x the unfused graph under load here, ``bench/small_ops.py``). Not exact: the service
  admits it only through the accuracy guard (:mod:`ranker.autoselect`).

Every backend returns the raw head outputs keyed by task, as ``RankingModel.forward`` does, so
:func:`ranker.heads.head_prediction` turns all of them into served units the same way.
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Callable
from typing import Literal, get_args

import numpy as np
import torch
from torch import Tensor, nn

from ranker.model import RankingModel
from ranker.modules import ColumnSplit, ExpertBank, SplitInput

BackendName = Literal["eager", "torchscript", "onnx", "onnx-int8", "bf16"]
BACKENDS: tuple[str, ...] = get_args(BackendName)

# cat (B, C) int64, num (B, N) float32 -> task -> raw (B,) or (B, K)
Scorer = Callable[[np.ndarray, np.ndarray], dict[str, Tensor]]

_EXAMPLE_ROWS = 8  # batch size of the tracing example; the batch axis stays dynamic


class _TupleOutputs(nn.Module):
    """The model with its outputs as a tuple in task order: tracers and exporters want tuples,
    not dicts."""

    def __init__(self, model: RankingModel, split: ColumnSplit | None = None) -> None:
        super().__init__()
        self.model = model
        self.tasks = list(model.tasks)
        self.split = split

    def forward(self, cat: Tensor, num: Tensor) -> tuple[Tensor, ...]:
        raw = self.model(cat, num, self.split)
        return tuple(raw[t] for t in self.tasks)


def _example(model: RankingModel, rows: int = _EXAMPLE_ROWS) -> tuple[Tensor, Tensor]:
    """Valid inputs (code 0 = unknown / padding in every categorical column) for tracing."""
    emb = model.embed
    cat = torch.zeros(rows, model.num_cat_columns, dtype=torch.long)
    num = torch.zeros(rows, emb.num_numeric, dtype=torch.float32)
    return cat, num


def eager_scorer(model: RankingModel, split: ColumnSplit | None = None) -> Scorer:
    """The model as it is: the reference every other backend is tested against."""
    model.eval()

    @torch.inference_mode()
    def score(cat: np.ndarray, num: np.ndarray) -> dict[str, Tensor]:
        return model(torch.from_numpy(cat), torch.from_numpy(num), split)

    return score


class _Bf16Experts(nn.Module):
    """An :class:`~ranker.modules.ExpertBank` run in bfloat16: its input cast down, its output
    cast back to float32, so the gates that mix the experts and the towers after them stay fp32.
    The bank's own forward runs on bf16 weights (one definition of the experts), except with
    ``fuse_relu`` for an input shared by every expert: then the first layer, one
    ``(B, In) @ (In, E*H1)`` product, runs as oneDNN's linear with relu in its epilogue
    (``mkldnn::_linear_pointwise``, the op torch.compile's inductor emits for linear + relu),
    so the product is written once, already rectified, instead of written and then rewritten by
    a separate relu; the later layers are the bank's own (:meth:`ExpertBank.deeper`)."""

    def __init__(self, bank: ExpertBank, fuse_relu: bool = True) -> None:
        super().__init__()
        self.bank = bank.to(torch.bfloat16)
        # oneDNN's bf16 linear needs AVX-512 (or AVX-NE-CONVERT); elsewhere the bank's own
        # forward runs (emulated bf16, which auto does not try there anyway)
        self.fuse_relu = fuse_relu and _onednn_bf16()

    def forward(self, x: Tensor | SplitInput) -> Tensor:
        if isinstance(x, SplitInput):
            x = SplitInput(x.rows.to(torch.bfloat16), x.shared.to(torch.bfloat16), x.split)
        else:
            x = x.to(torch.bfloat16)
        if self.fuse_relu and (isinstance(x, SplitInput) or x.dim() == 2):
            return self.bank.deeper(self._first_layer(x)).float()
        return self.bank(x).float()

    def _first_layer(self, x: Tensor | SplitInput) -> Tensor:
        """relu(x @ W0 + b0) as ``(B, E*H1)``, with the relu in the matmul's epilogue."""
        w0 = self.bank.weights[0]  # (E, In, H1)
        e, d_in, h1 = w0.shape
        w = w0.permute(0, 2, 1).reshape(e * h1, d_in)  # (Out, In), as nn.Linear holds it
        bias = self.bank.biases[0].reshape(e * h1)
        if isinstance(x, SplitInput):  # the shared columns once, folded into the bias
            bias = bias + (x.shared @ w[:, x.split.shared].T).view(-1)
            w, x = w[:, x.split.rows], x.rows
        return _linear_relu(x, w, bias)


def _onednn_bf16() -> bool:
    """Whether oneDNN runs bf16 linears on this CPU."""
    return torch.backends.mkldnn.is_available() and bool(
        torch.ops.mkldnn._is_mkldnn_bf16_supported()
    )


@torch.jit.script
def _linear_relu(x: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
    """oneDNN linear with relu as a post-op. Scripted, so a trace records the call: the tracer
    cannot record the op's empty ``Scalar?[]`` argument by itself."""
    scalars: list[int | float | complex | None] = []
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "relu", scalars, "")


def bf16_experts(model: RankingModel, fuse_relu: bool = True) -> RankingModel:
    """A copy of ``model`` whose expert banks run in bfloat16 (:class:`_Bf16Experts`); every
    architecture's experts are :class:`~ranker.modules.ExpertBank`s, so this covers them all.
    ``fuse_relu=False``: the first layer's relu as a separate op (the engine before the fusion,
    kept for ``bench/small_ops.py``)."""
    import copy

    twin = copy.deepcopy(model).eval()
    banks = [(n, m) for n, m in twin.named_modules() if isinstance(m, ExpertBank)]
    for name, bank in banks:
        parent_name, _, attr = name.rpartition(".")
        parent = twin.get_submodule(parent_name) if parent_name else twin
        setattr(parent, attr, _Bf16Experts(bank, fuse_relu))
    return twin


def bf16_scorer(
    model: RankingModel, split: ColumnSplit | None = None, fuse_relu: bool = True
) -> Scorer:
    """The expert layers in bfloat16 (:func:`bf16_experts`), traced and frozen like
    :func:`torchscript_scorer`: freezing folds the per-call weight reshapes and column selections
    into constants, copies that eager pays on every forward."""
    return torchscript_scorer(bf16_experts(model, fuse_relu), split)


def torchscript_scorer(model: RankingModel, split: ColumnSplit | None = None) -> Scorer:
    """Traced, frozen and optimised for inference (weights become constants, linear + relu
    fuse); the traced graph has no Python in it, so per-op overhead drops."""
    model.eval()
    wrapped = _TupleOutputs(model, split).eval()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # jit's deprecation notice: we know, it is the fallback
        traced = torch.jit.trace(wrapped, _example(model), check_trace=False)
        frozen = torch.jit.optimize_for_inference(torch.jit.freeze(traced))
    tasks = wrapped.tasks

    @torch.inference_mode()
    def score(cat: np.ndarray, num: np.ndarray) -> dict[str, Tensor]:
        out = frozen(torch.from_numpy(cat), torch.from_numpy(num))
        return dict(zip(tasks, out, strict=True))

    return score


def export_onnx(model: RankingModel, split: ColumnSplit | None = None) -> bytes:
    """The eval-mode model as an ONNX graph (legacy exporter, dynamic batch axis), in memory;
    with ``split`` the graph computes those columns' first-layer share once (from row 0)."""
    model.eval()
    wrapped = _TupleOutputs(model, split).eval()
    outputs = [f"raw.{t}" for t in wrapped.tasks]
    buf = io.BytesIO()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "legacy exporter": chosen on purpose (module docstring)
        torch.onnx.export(
            wrapped,
            _example(model),
            buf,
            dynamo=False,
            input_names=["cat", "num"],
            output_names=outputs,
            dynamic_axes={"cat": {0: "batch"}, "num": {0: "batch"}}
            | {o: {0: "batch"} for o in outputs},
            opset_version=17,
        )
    return buf.getvalue()


def quantize_int8(onnx_model: bytes) -> bytes:
    """Dynamic int8 quantisation (weights int8, activations quantised per batch) of an ONNX
    graph, in memory (the quantiser wants paths, so a temporary directory holds them)."""
    import tempfile
    from pathlib import Path

    from onnxruntime.quantization import QuantType, quantize_dynamic

    with tempfile.TemporaryDirectory(prefix="ranker-onnx-") as d:
        src, dst = Path(d) / "fp32.onnx", Path(d) / "int8.onnx"
        src.write_bytes(onnx_model)
        quantize_dynamic(src, dst, weight_type=QuantType.QInt8)
        return dst.read_bytes()


def onnx_scorer(
    model: RankingModel,
    threads: int | None = None,
    int8: bool = False,
    split: ColumnSplit | None = None,
) -> Scorer:
    """ONNX Runtime on the exported graph; ``threads`` intra-op threads (``None``: ORT's default,
    one per core), one inter-op thread (the graph is a chain, nothing runs beside it)."""
    import onnxruntime as ort

    graph = export_onnx(model, split)
    if int8:
        graph = quantize_int8(graph)
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.inter_op_num_threads = 1
    if threads:
        opts.intra_op_num_threads = threads
    session = ort.InferenceSession(graph, opts, providers=["CPUExecutionProvider"])
    tasks = list(model.tasks)
    names = [f"raw.{t}" for t in tasks]

    def score(cat: np.ndarray, num: np.ndarray) -> dict[str, Tensor]:
        feed = {
            "cat": np.ascontiguousarray(cat, dtype=np.int64),
            "num": np.ascontiguousarray(num, dtype=np.float32),
        }
        out = session.run(names, feed)
        return {t: torch.from_numpy(o) for t, o in zip(tasks, out, strict=True)}

    return score


def build_scorer(
    model: RankingModel,
    backend: str = "eager",
    threads: int | None = None,
    split: ColumnSplit | None = None,
) -> Scorer:
    """The scorer for ``backend`` (one of :data:`BACKENDS`); ``threads`` is used by the ONNX
    Runtime backends (torch backends follow ``torch.set_num_threads``). With ``split``
    (:meth:`RankingModel.forward`) the scorer expects rows that agree on those columns, as one
    request's rows do, and computes their first-layer share once."""
    if backend == "eager":
        return eager_scorer(model, split)
    if backend == "torchscript":
        return torchscript_scorer(model, split)
    if backend == "onnx":
        return onnx_scorer(model, threads, split=split)
    if backend == "onnx-int8":
        return onnx_scorer(model, threads, int8=True, split=split)
    if backend == "bf16":
        return bf16_scorer(model, split)
    raise ValueError(f"unknown scoring backend {backend!r}; known: {list(BACKENDS)}")
