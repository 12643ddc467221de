"""Small shared pieces for feature methods: bridging channel and resolution mismatches."""

from __future__ import annotations

from torch import Tensor, nn
from torch.nn import functional as F


def conv_bn(c_in: int, c_out: int, kernel: int = 1) -> nn.Sequential:
    """The default connector (1×1 conv + BN), mapping student channels to teacher channels."""
    return nn.Sequential(nn.Conv2d(c_in, c_out, kernel, padding=kernel // 2, bias=False), nn.BatchNorm2d(c_out))


def match_spatial(f: Tensor, size: tuple[int, int]) -> Tensor:
    """Resize an NCHW map to ``size``: average-pool when larger, bilinear when smaller."""
    h, w = f.shape[-2:]
    if (h, w) == tuple(size):
        return f
    if h >= size[0] and w >= size[1]:
        return F.adaptive_avg_pool2d(f, size)
    return F.interpolate(f, size=size, mode="bilinear", align_corners=False)


def smaller(a: tuple[int, ...], b: tuple[int, ...]) -> tuple[int, int]:
    """The smaller of two (…, H, W) spatial sizes, element-wise (the common grid two maps are compared on)."""
    return (min(a[-2], b[-2]), min(a[-1], b[-1]))
