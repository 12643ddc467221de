"""Fold eval-mode BatchNorm2d layers into the Conv2d that feeds them, in place.

A distillation teacher is frozen and only ever run in eval mode under inference, where a BatchNorm is a fixed
per-channel affine map: ``bn(conv(x))`` equals one conv with rescaled weights and a shifted bias. Folding every
such pair removes one op (and one pass over the activation) per conv, and leaves the logits equal to those of
the unfolded network up to float rounding. This is the standard conv-BN fold, as done by
``torch.fx.experimental.optimization.fuse``; the arithmetic is ``torch.nn.utils.fusion.fuse_conv_bn_weights``.

Unlike ``fuse``, the network is changed in place and keeps its module tree: a folded BatchNorm is replaced by
``nn.Identity()`` under the same name and the conv keeps its name (and gains a bias when it had none), so
``forward_intermediates``, ``feature_info`` and forward hooks by module name still work. Only
``nn.BatchNorm2d`` modules go (hook outputs at the Identity equal the BN's outputs).

How pairs are found: the network's ``forward`` is traced with ``torch.fx`` (timm's no-trace modules and
functions as leaves; a leaf, or a part that cannot be traced, is analysed on its own); ``forward_features`` and
``forward_intermediates``, where the module has them and they trace, are traced too. A (conv, bn) pair is
folded only when, in every traced graph, each call of the BN takes exactly the output of that conv and each
call of the conv feeds exactly that BN and nothing else. Also required: the BN is an ``nn.BatchNorm2d`` in eval
mode that tracks running statistics, the conv is an ``nn.Conv2d`` (any groups, stride, dilation, padding
mode), neither has hooks, and no parameter or buffer of either is read directly by the graph.
Modules named in ``feature_info`` are left alone (their outputs may be read by hooks).

Limits:

* Only the ``forward`` of each module (plus the two timm entry points above) is seen: a module whose parent
  reaches into it (calls ``self.block.conv`` directly from an untraced method), or conv outputs read another
  way, are not detected.
* Where a module's ``forward`` cannot be traced at all, its direct children are paired structurally:
  consecutive children named ``conv``/``bn``, ``conv1``/``bn1``, ``conv2``/``bn2``... are folded on the
  assumption that the conv feeds only the BN (still vetoed by what the traced graphs show). Pass
  ``structural=False`` to fold only what a trace proves.
* Fused norm-act layers (timm's ``BatchNormAct2d``, as in EfficientNets), other conv types (``Conv2dSame``,
  ``StdConv2d``, transposed convs) and BN before a conv (pre-activation nets) are not folded.
* The result is for inference: back in training mode the folded conv does not renormalise, and the
  ``state_dict`` keys change (BN buffers gone, conv biases added), so fold after loading weights.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch
from torch import fx, nn
from torch.nn.utils.fusion import fuse_conv_bn_weights

__all__ = ["fold_batchnorm"]

_ENTRY_POINTS = ("forward_features", "forward_intermediates")  # extra timm entry points checked when traceable
_CONV_NAME = re.compile(r"conv(\d*)")  # structural fallback: conv/bn, conv1/bn1, conv2/bn2, ...


def _timm_notrace() -> tuple[tuple[type, ...], tuple]:
    try:
        from timm.layers._fx import get_notrace_functions, get_notrace_modules
    except ImportError:  # older or newer timm: plain torch.fx tracing
        return (), ()
    return tuple(get_notrace_modules()), tuple(get_notrace_functions())


class _Tracer(fx.Tracer):
    """torch.fx's tracer, with timm's no-trace modules as leaves and no-trace functions wrapped."""

    def __init__(self):
        leaves, functions = _timm_notrace()
        super().__init__(autowrap_functions=functions)
        self._leaves = leaves

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return isinstance(m, self._leaves) or super().is_leaf_module(m, module_qualified_name)


class _Entry(nn.Module):
    """Traces another method of ``net`` (e.g. ``forward_intermediates``) as if it were ``forward``."""

    def __init__(self, net: nn.Module, entry: str):
        super().__init__()
        self.net = net
        self.entry = entry

    def forward(self, x):
        return getattr(self.net, self.entry)(x)


def _is_conv(m: nn.Module) -> bool:
    return type(m) is nn.Conv2d


def _is_bn(m: nn.Module) -> bool:
    return type(m) is nn.BatchNorm2d


def _has_targets(m: nn.Module) -> bool:
    """Whether a module with children holds a conv or BN worth analysing."""
    return next(m.children(), None) is not None and any(_is_conv(x) or _is_bn(x) for x in m.modules())


def _trace(module: nn.Module) -> fx.Graph | None:
    try:
        return _Tracer().trace(module)
    except Exception:  # data-dependent control flow, unsupported ops, ...: not traceable
        return None


@dataclass
class _Uses:
    """What the traces saw: conv -> BN pairs (modules compare by identity) and modules that must not change."""

    pairs: set[tuple[nn.Module, nn.Module]] = field(default_factory=set)
    bad: set[nn.Module] = field(default_factory=set)


def _scan(graph: fx.Graph, root: nn.Module, uses: _Uses) -> list[nn.Module]:
    """Record the graph's conv/BN uses into ``uses``; return the called modules whose insides it did not see."""
    modules = dict(root.named_modules())
    opaque = []
    for node in graph.nodes:
        if node.op == "get_attr":  # a parameter or buffer read directly (e.g. F.conv2d(x, self.conv.weight))
            parts = str(node.target).split(".")
            uses.bad.update(modules[p] for p in (".".join(parts[:i]) for i in range(1, len(parts))) if p in modules)
        elif node.op == "call_module":
            m = modules[node.target]
            if _is_conv(m):
                users = list(node.users)
                bn = modules.get(users[0].target) if len(users) == 1 and users[0].op == "call_module" else None
                if bn is not None and _is_bn(bn) and users[0].args == (node,) and not users[0].kwargs:
                    uses.pairs.add((m, bn))
                else:
                    uses.bad.add(m)
            elif _is_bn(m):
                src = node.args[0] if len(node.args) == 1 and not node.kwargs else None
                if not (isinstance(src, fx.Node) and src.op == "call_module" and _is_conv(modules[src.target])):
                    uses.bad.add(m)
            elif _has_targets(m):
                opaque.append(m)
    return opaque


def _structural(module: nn.Module, uses: _Uses) -> None:
    children = list(module.named_children())
    for (a, conv), (b, bn) in zip(children, children[1:], strict=False):
        name = _CONV_NAME.fullmatch(a)
        if name and b == "bn" + name.group(1) and _is_conv(conv) and _is_bn(bn):
            uses.pairs.add((conv, bn))


def _collect(module: nn.Module, uses: _Uses, structural: bool, seen: set[nn.Module]) -> None:
    if module in seen:
        return
    seen.add(module)
    graph = _trace(module)
    if graph is None:
        if structural:
            _structural(module, uses)
        inner = [child for child in module.children() if _has_targets(child)]
    else:
        inner = _scan(graph, module, uses)
    for entry in _ENTRY_POINTS:
        if callable(getattr(module, entry, None)):
            wrapper = _Entry(module, entry)
            extra = _trace(wrapper)
            if extra is not None:
                _scan(extra, wrapper, uses)
    for info in getattr(module, "feature_info", None) or []:
        name = info.get("module") if isinstance(info, dict) else None
        if isinstance(name, str):
            try:
                uses.bad.add(module.get_submodule(name))
            except AttributeError:
                pass
    for m in inner:
        _collect(m, uses, structural, seen)


def _foldable(conv: nn.Module, bn: nn.Module) -> bool:
    hooked = any(h for m in (conv, bn) for h in (m._forward_hooks, m._forward_pre_hooks, m._backward_hooks))
    stats = bn.track_running_stats and bn.running_mean is not None and bn.running_var is not None
    return not hooked and stats and not bn.training and conv.out_channels == bn.num_features


def fold_batchnorm(net: nn.Module, *, structural: bool = True) -> int:
    """Fold every eval-mode ``BatchNorm2d`` fed only by a ``Conv2d`` into that conv, in place.

    The conv's weight and bias become new Parameters, ``fuse_conv_bn_weights`` of the pair (a bias is created
    when the conv had none), and the BN is replaced by ``nn.Identity()`` under the same name(s); all other
    modules and names stay. Pass the timm network itself (a kdcli ``Classifier``'s ``.net``), in eval mode: BNs
    in training mode or without running statistics are skipped. ``structural=False`` disables the name-based
    fallback for untraceable modules (see the module docstring). Returns the number of BatchNorms folded; 0
    when nothing is found safe to fold, in which case the network is unchanged.
    """
    uses = _Uses()
    _collect(net, uses, structural, set())
    convs: dict[nn.Module, int] = {}
    bns: dict[nn.Module, int] = {}
    for conv, bn in uses.pairs:
        convs[conv] = convs.get(conv, 0) + 1
        bns[bn] = bns.get(bn, 0) + 1
    folded: dict[nn.Module, nn.Module] = {}  # BN -> its Identity
    with torch.no_grad():
        for conv, bn in uses.pairs:
            if conv in uses.bad or bn in uses.bad or convs[conv] > 1 or bns[bn] > 1 or not _foldable(conv, bn):
                continue
            weight, bias = fuse_conv_bn_weights(conv.weight, conv.bias, bn.running_mean, bn.running_var, bn.eps,
                                                bn.weight, bn.bias)
            conv.weight, conv.bias = weight, bias.requires_grad_(weight.requires_grad)  # a new bias: as the weight
            folded[bn] = nn.Identity()
    for parent in list(net.modules()):
        for name, child in list(parent._modules.items()):  # every name a folded BN is registered under
            if child is not None and child in folded:
                setattr(parent, name, folded[child])
    return len(folded)
