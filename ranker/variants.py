"""Variants of the ranking score: which users get which weights, and adding a variant to a config.

Assignment is by user, not by request: a user who saw one ranking on Monday and another on
Tuesday would blur both arms' effects, and per-user metrics (the users counted in
``ranker ab-report``) need a user to stay in one arm. So the arm is a pure function of the user
id and the config: a 64-bit hash of ``user_id XOR key(salt)`` (the SplitMix64 finaliser, Steele,
Lea and Flood, *Fast splittable pseudorandom number generators*, OOPSLA 2014), read as a number
``u`` in ``[0, 1)``; variant ``i`` takes the users whose ``u`` falls in
``[s_1 + ... + s_{i-1}, s_1 + ... + s_i)``, the rest (``u >= sum of shares``) are ``control``.
The same on every worker, replica and process start: no Python ``hash()`` (salted per process),
no state. The salt comes from the config: a new experiment with a new salt reshuffles users, so
the users of one experiment's winning arm do not all land in the next experiment's treatment
(the carry-over effect in Kohavi, Tang and Xu, *Trustworthy Online Controlled Experiments*,
2020, ch. 21); while the salt stays, growing the last variant's share only adds users to it.
"""

from __future__ import annotations

import bisect
import functools
import hashlib
import os
import tempfile
from itertools import accumulate
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from ranker.errors import ConfigError

if TYPE_CHECKING:
    from ranker.scoring import RankingConfig

CONTROL = "control"
"""The arm of the users no variant takes: the config's base weights."""
VARIANT_NAME = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"
"""A variant's name: a short label, as it appears in metrics, logs and reports."""

_M64 = (1 << 64) - 1
_GOLDEN = 0x9E3779B97F4A7C15
_MIX1 = 0xBF58476D1CE4E5B9
_MIX2 = 0x94D049BB133111EB
_TO_UNIT = 2.0**-53


@functools.lru_cache(maxsize=64)
def salt_key(salt: str) -> int:
    """64 bits from the salt (BLAKE2b), XORed into every user id before hashing (cached: a
    request assigns one user with the serving config's salt)."""
    return int.from_bytes(hashlib.blake2b(salt.encode(), digest_size=8).digest(), "little")


def user_unit(user_ids: np.ndarray, salt: str) -> np.ndarray:
    """Each user's position ``u`` in ``[0, 1)`` (float64), vectorised: SplitMix64 of the id
    (two's complement for negative ids) XOR the salt's key, top 53 bits."""
    z = np.asarray(user_ids, dtype=np.int64).view(np.uint64) ^ np.uint64(salt_key(salt))
    z = z + np.uint64(_GOLDEN)  # numpy's uint64 arithmetic wraps, as the algorithm needs
    z = (z ^ (z >> np.uint64(30))) * np.uint64(_MIX1)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(_MIX2)
    z = z ^ (z >> np.uint64(31))
    return (z >> np.uint64(11)).astype(np.float64) * _TO_UNIT


def _unit_one(user_id: int, salt: str) -> float:
    """:func:`user_unit` of one id in Python integers: a request assigns one user, where a
    numpy call costs more than the arithmetic."""
    z = (((user_id & _M64) ^ salt_key(salt)) + _GOLDEN) & _M64
    z = ((z ^ (z >> 30)) * _MIX1) & _M64
    z = ((z ^ (z >> 27)) * _MIX2) & _M64
    z ^= z >> 31
    return (z >> 11) * _TO_UNIT


def assign(user_ids: np.ndarray, salt: str, shares: list[float]) -> np.ndarray:
    """The variant index of every user (``-1``: control), vectorised."""
    bounds = np.asarray(list(accumulate(shares)), dtype=np.float64)
    idx = np.searchsorted(bounds, user_unit(user_ids, salt), side="right")
    return np.where(idx < len(shares), idx, -1)


def assign_one(user_id: int, salt: str, shares: list[float]) -> int:
    """:func:`assign` for one user; the same answer (``tests/ranker/test_variants.py``)."""
    i = bisect.bisect_right(list(accumulate(shares)), _unit_one(user_id, salt))
    return i if i < len(shares) else -1


def _float(x: float) -> str:
    s = repr(float(x))
    return s if any(c in s for c in ".en") else s + ".0"


def variant_toml(name: str, share: float, config: RankingConfig, note: list[str] = ()) -> str:
    """A ``[[variants]]`` block with ``config``'s formula and head weights."""
    lines = [f"# {n}" for n in note]
    lines += ["[[variants]]", f'name = "{name}"', f"share = {_float(share)}"]
    lines.append(f'formula = "{config.formula}"')
    for head, h in config.heads.items():
        lines += ["", f"[variants.heads.{head}]", f"weight = {_float(h.weight)}"]
        if h.transform != "identity":
            lines.append(f'transform = "{h.transform}"')
    return "\n".join(lines) + "\n"


def add_variant(
    path: Path,
    name: str,
    share: float,
    config: RankingConfig,
    tasks: list[str],
    note: list[str] = (),
    dry_run: bool = False,
) -> RankingConfig:
    """Appends ``config``'s weights to the ranking config at ``path`` as variant ``name`` with
    ``share`` of the users, keeping the file's text (comments included) as it is. The result is
    checked first (shares, names, heads against ``tasks``) and written atomically, so a service
    that hot-reloads the file never reads half of it; nothing is written when it is refused
    (or with ``dry_run``: the checks alone, before a long job that would end by writing)."""
    from ranker.scoring import RankingFormula, parse_ranking_config

    try:
        text = path.read_text()
    except FileNotFoundError:
        raise ConfigError(f"ranking config {path} does not exist (--into)") from None
    current = parse_ranking_config(text, str(path))
    if any(v.name == name for v in current.variants):
        raise ConfigError(
            f"ranking config {path}: variants: {name!r} is already declared; remove it or choose "
            "another name"
        )
    new_text = text.rstrip("\n") + "\n\n" + variant_toml(name, share, config, note)
    new = parse_ranking_config(new_text, f"{path} with variant {name!r}")
    RankingFormula(new, tasks)
    if dry_run:
        return new
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(new_text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return new
