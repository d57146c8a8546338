"""Checks of editor settings that every editor shares: each names the key and the values it may take."""
from __future__ import annotations

import math
from typing import Sequence

from torch import nn

from evaluation.common.errors import ConfigError
from evaluation.editing.models import LoadedModel, get_module, layer_dims


def check_layer(model: LoadedModel, key: str, index: int) -> None:
    n = model.num_layers
    if not 0 <= index < n:
        raise ConfigError(f"editor.{key}={index} is out of range for model '{model.name}' with {n} layers "
                          f"(valid: 0..{n - 1})")


def check_choice(key: str, value: str, choices: Sequence[str]) -> None:
    if value not in choices:
        raise ConfigError(f"editor.{key} must be one of {tuple(choices)}, got {value!r}")


def check_positive(key: str, value: float) -> None:
    if not (value > 0 and math.isfinite(value)):  # NaN fails both; inf would train nothing sensible either
        raise ConfigError(f"editor.{key} must be positive, got {value}")


def resolve_rewrite_module(model: LoadedModel, layer: int, module_template: str) -> tuple[str, nn.Module]:
    """Name and module of ``module_template`` at ``layer``, or a ConfigError naming the bad key."""
    n = model.num_layers
    if not 0 <= layer < n:
        raise ConfigError(f"editor.layer={layer} is out of range for model '{model.name}' with {n} layers "
                         f"(valid: 0..{n - 1})")
    if "{i}" not in module_template:
        raise ConfigError(f"editor.module_template must contain '{{i}}' for the layer index, got {module_template!r}")
    name = module_template.format(i=layer)
    module = get_module(model.model, name, num_layers=n)
    try:
        layer_dims(module)
    except TypeError as err:
        raise ConfigError(f"editor.module_template={module_template!r}: {err}") from None
    return name, module
