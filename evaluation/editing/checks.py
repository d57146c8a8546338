"""Checks of editor settings that every editor shares: each names the key and the values it may take."""
from __future__ import annotations

from typing import Sequence

from evaluation.common.errors import ConfigError
from evaluation.editing.models import LoadedModel


def check_layer(model: LoadedModel, key: str, index: int) -> None:
    n = model.num_layers
    if not 0 <= index < n:
        raise ConfigError(f"editor.{key}={index} is out of range for model '{model.name}' with {n} layers "
                          f"(valid: 0..{n - 1})")


def check_choice(key: str, value: str, choices: Sequence[str]) -> None:
    if value not in choices:
        raise ConfigError(f"editor.{key} must be one of {tuple(choices)}, got {value!r}")


def check_positive(key: str, value: float) -> None:
    if not value > 0:
        raise ConfigError(f"editor.{key} must be positive, got {value}")
