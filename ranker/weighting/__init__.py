"""Task-weighting strategies, one module each, found by config name.

Importing this package imports every module in it, so a new strategy is one new file with a
``@register("name")`` class and its config class; the config union below picks it up.
"""

from __future__ import annotations

import importlib
import pkgutil
from typing import Annotated, Any, Union

from pydantic import Field

from ranker.weighting.base import (
    GradientConfigBase,
    GradientWeighting,
    LossWeighting,
    SharedPart,
    Weighting,
    WeightingConfigBase,
    register,
    registry,
)

for _mod in sorted(m.name for m in pkgutil.iter_modules(__path__)):
    if _mod != "base" and not _mod.startswith("_"):
        importlib.import_module(f"{__name__}.{_mod}")

_CONFIGS = tuple(cls.config_class for _, cls in sorted(registry().items()))

WeightingConfig: Any = Annotated[Union[_CONFIGS], Field(discriminator="name")]  # noqa: UP007
"""Pydantic discriminated union over every registered strategy's config, keyed by ``name``."""


def build_weighting(config: WeightingConfigBase, tasks: list[str]) -> Weighting:
    """Instantiates the strategy a validated config names."""
    name = config.name
    return registry()[name](tasks, config)


__all__ = [
    "GradientConfigBase",
    "GradientWeighting",
    "LossWeighting",
    "SharedPart",
    "Weighting",
    "WeightingConfig",
    "WeightingConfigBase",
    "build_weighting",
    "register",
    "registry",
]
