"""Mean calibration of the watch-time heads that serve a mean in seconds, on the training rows.

A zero-inflated lognormal (Wang, Liu & Miao 2019) serves ``p * exp(mu + sigma^2 / 2)``, which is
the mean only when ``T | T > 0`` is lognormal. Watch time is not: it is bounded by the video's
duration and has mass near zero (a skipped video), so ``log T`` has a long left tail; the fit
widens ``sigma`` to cover it and the served mean overshoots (1.5x the label mean on the demo
world). One scale factor ``c = sum(T) / sum(prediction)`` over the training rows, folded into the
bias of the ``mu`` output (``exp(mu + log c + ...) = c * exp(mu + ...)``), makes the mean right
again; it multiplies every prediction by the same number, so no ranking changes.

A weighted-logistic head (Covington et al. 2016) serves the odds ``exp(z)``, which equal the mean
watch time per impression only at the loss's optimum and when ``P(T > 0)`` is small. Trained
under FAMO (``ranker/weighting/famo.py``, the demo default) it served 1.17x the mean label on the
demo world's validation days (``bench/watch_default.py --weighting equal,famo``; 1.04x under
equal weighting). Its bias takes the same one factor.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from ranker.config import Config
from ranker.model import RankingModel
from training.data import BatchBuilder, ImpressionLog
from training.evaluate import predict_split

# The raw output whose bias scales the served mean by exp(bias): the ZILN head's outputs are
# (logit, mu, sigma), the weighted-logistic head's one output is the log-odds.
SCALE_OUTPUT = {"ziln": 1, "weighted_logistic": 0}


def calibrate_means(
    config: Config,
    model: RankingModel,
    builder: BatchBuilder,
    log: ImpressionLog,
    device: str = "cpu",
) -> dict[str, float]:
    """Rescales every ZILN and weighted-logistic head so that its mean prediction on the
    training rows equals the mean label; returns the factor applied per head (nothing without
    such a head)."""
    heads = [t for t in config.tasks if t.loss in SCALE_OUTPUT]
    if not heads:
        return {}
    preds = predict_split(model, builder, log, "train", device=device)
    factors: dict[str, float] = {}
    for t in heads:
        m = preds.masks[t.name]
        served = float(np.sum(preds.preds[t.name][m]))
        label = float(np.sum(preds.labels[t.name][m]))
        if served <= 0 or label <= 0:
            continue
        c = label / served
        last = model.towers[t.name][-1]
        assert isinstance(last, torch.nn.Linear)
        with torch.no_grad():
            last.bias[SCALE_OUTPUT[t.loss]] += math.log(c)
        factors[t.name] = c
    return factors
