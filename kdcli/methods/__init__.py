"""Distillation methods: one registry, one small class per method, grouped by family."""

from kdcli.methods import logits  # noqa: F401  (registers the methods)
from kdcli.methods.base import Method, MethodArgs, Outputs, Shapes, available, build, get, parse_args

__all__ = ["Method", "MethodArgs", "Outputs", "Shapes", "available", "build", "get", "parse_args"]
