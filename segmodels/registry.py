"""The model registry: a plain dict of keyword-only builder functions, filled by `@register_model`.

`build_model(name, num_classes, **kw)` is the one front door; it checks the name and the keyword
arguments against the builder's signature so mistakes fail with the list of valid choices.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable

from torch import nn

MODEL_REGISTRY: dict[str, Callable[..., nn.Module]] = {}


def register_model(builder: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    """Decorator: register `builder` (keyword-only, first argument `num_classes`) under its function name."""
    if builder.__name__ in MODEL_REGISTRY:
        raise ValueError(f"model {builder.__name__!r} is already registered")
    MODEL_REGISTRY[builder.__name__] = builder
    return builder


def model_options(name: str) -> dict[str, object]:
    """The keyword arguments `name` accepts besides num_classes, with their defaults."""
    params = inspect.signature(_builder(name)).parameters
    return {key: p.default for key, p in params.items() if key != "num_classes"}


def build_model(name: str, num_classes: int, **kwargs: object) -> nn.Module:
    """Build registered model `name` for `num_classes` classes; `kwargs` are the builder's options."""
    builder = _builder(name)
    options = model_options(name)
    unknown = sorted(set(kwargs) - set(options))
    if unknown:
        valid = ", ".join(f"{k}={v!r}" for k, v in options.items())
        raise TypeError(f"{name} got unknown option(s) {', '.join(unknown)}; valid options: {valid}")
    return builder(num_classes=num_classes, **kwargs)


def _builder(name: str) -> Callable[..., nn.Module]:
    if name not in MODEL_REGISTRY:
        raise ValueError(f"unknown model {name!r}; valid names: {', '.join(MODEL_REGISTRY)}")
    return MODEL_REGISTRY[name]
