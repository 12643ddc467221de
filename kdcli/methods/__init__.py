"""Distillation methods: one registry, one small class per method, grouped by family."""

from kdcli.methods import (  # noqa: F401  (registers the methods)
    boundary,
    contrastive,
    features,
    logits,
    online,
    relations,
    review,
)
from kdcli.methods.base import (
    Composite,
    Method,
    MethodArgs,
    MethodSpec,
    Outputs,
    Shapes,
    available,
    build,
    get,
    parse_args,
    spec,
)

__all__ = ["Composite", "Method", "MethodArgs", "MethodSpec", "Outputs", "Shapes", "available", "build", "get",
           "parse_args", "spec"]
