"""PyTorch networks behind dimscope's models (training, export, the torch runtimes).

Importing this module needs torch; the daemon's CPU path never does (it runs
the exported ONNX files). Every network is built by `build_network(arch, **hp)`
from the architecture name and hyper-parameters stored in the model card, so a
runtime can rebuild the exact network from an ONNX file alone.

- `restore`: the live default. Space-to-depth at the input so the whole body
  runs at half resolution, a small U-Net body (additive skips, pixel-shuffle
  upsampling), a head back to full (or ×2) sampling and a global residual.
  `scale=1` is the denoiser, `scale=2` the ×2 super-resolver.
- `care_unet`: the CARE-style reference U-Net (full resolution, concatenated
  skips, max-pool / upsample) used only to report what the live model gives up.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


def _conv(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 3, stride=stride, padding=1)


class _Block(nn.Sequential):
    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__(_conv(cin, cout, stride), nn.ReLU(inplace=True),
                         _conv(cout, cout), nn.ReLU(inplace=True))


class RestoreNet(nn.Module):
    """Denoiser (scale 1) or ×2 super-resolver (scale 2) working at half resolution."""

    def __init__(self, scale: int = 1, channels: int = 24, levels: int = 2) -> None:
        super().__init__()
        if scale not in (1, 2):
            raise ValueError(f"scale must be 1 or 2, got {scale}")
        self.scale, self.levels = scale, levels
        widths = [channels * 2**i for i in range(levels + 1)]
        self.stem = _Block(4, widths[0])
        self.down = nn.ModuleList(_Block(widths[i], widths[i + 1], stride=2)
                                  for i in range(levels))
        self.up = nn.ModuleList(
            nn.Sequential(nn.Conv2d(widths[i + 1], widths[i] * 4, 1), nn.PixelShuffle(2))
            for i in range(levels))
        self.fuse = nn.ModuleList(_Block(widths[i], widths[i]) for i in range(levels))
        out_shuffle = 2 * scale
        self.head = nn.Sequential(nn.Conv2d(widths[0], out_shuffle**2, 3, padding=1),
                                  nn.PixelShuffle(out_shuffle))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.stem(F.pixel_unshuffle(x, 2))
        skips = [h]
        for down in self.down:
            h = down(h)
            skips.append(h)
        skips.pop()
        for i in reversed(range(self.levels)):
            h = self.fuse[i](self.up[i](h) + skips[i])
        base = x if self.scale == 1 else F.interpolate(x, scale_factor=2.0, mode="bilinear",
                                                       align_corners=False)
        return base + self.head(h)


class CAREUNet(nn.Module):
    """CARE-style U-Net at full resolution (reference for the quality/speed trade-off)."""

    def __init__(self, scale: int = 1, channels: int = 32, levels: int = 3) -> None:
        super().__init__()
        self.scale, self.levels = scale, levels
        widths = [channels * 2**i for i in range(levels + 1)]
        self.enc = nn.ModuleList([_Block(1, widths[0])] + [
            _Block(widths[i], widths[i + 1]) for i in range(levels)])
        self.dec = nn.ModuleList(_Block(widths[i] + widths[i + 1], widths[i])
                                 for i in range(levels))
        self.head = nn.Conv2d(widths[0], scale * scale, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        base = x if self.scale == 1 else F.interpolate(x, scale_factor=2.0, mode="bilinear",
                                                       align_corners=False)
        h = self.enc[0](x)
        skips = [h]
        for enc in self.enc[1:]:
            h = enc(F.max_pool2d(h, 2))
            skips.append(h)
        skips.pop()
        for i in reversed(range(self.levels)):
            h = F.interpolate(h, scale_factor=2.0, mode="nearest")
            h = self.dec[i](torch.cat([h, skips[i]], dim=1))
        out = self.head(h)
        if self.scale == 2:
            out = F.pixel_shuffle(out, 2)
        return base + out


_ARCHS: dict[str, type[nn.Module]] = {"restore": RestoreNet, "care_unet": CAREUNet}


def build_network(arch: str, **hparams: Any) -> nn.Module:
    """The network named `arch` (see the module docstring) with its hyper-parameters."""
    if arch not in _ARCHS:
        raise ValueError(f"unknown architecture {arch!r}; known: {', '.join(sorted(_ARCHS))}")
    return _ARCHS[arch](**hparams)


def multiple_of(arch: str, hparams: dict[str, Any]) -> int:
    """Input height and width must be multiples of this (down-sampling steps)."""
    levels = int(hparams.get("levels", 2 if arch == "restore" else 3))
    return 2 ** (levels + 1) if arch == "restore" else 2**levels


def count_parameters(net: nn.Module) -> int:
    return sum(p.numel() for p in net.parameters())
