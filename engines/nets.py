"""PyTorch networks behind dimscope's models (training, export, the torch runtimes).

Importing this module needs torch; the daemon's CPU path never does (it runs
the exported ONNX files). Every network is built by `build_network(arch, **hp)`
from the architecture name and hyper-parameters stored in the model card, so a
runtime can rebuild the exact network from an ONNX file alone.

- `restore`: the live default. Space-to-depth at the input so the whole body
  runs at half resolution, a small U-Net body (additive skips, pixel-shuffle
  upsampling), a head back to full (or ×2) sampling and a global residual.
  `scale=1` is the denoiser, `scale=2` the ×2 super-resolver (a cross-modality transfer
  model uses the same body at scale 1, 2 or 4). With `window` K > 1
  the input holds K frames, oldest first (a causal window ending at the frame being
  restored: no added latency), and with `noise_map` one more channel holding the
  noise level of the variance-stabilised input, so one network serves 5 to 1000
  photons; the residual is added to the newest frame. With `guided` one more channel
  (after the frames) holds a classical estimate of the newest frame (BM3D/BM4D+VST,
  the offline quality models) and the residual is added to it instead: the network
  learns what the classical method gets wrong. With `deconvolved` (guided transfer
  models) one more channel after the guide holds the guide deconvolved by
  Richardson–Lucy, and the residual is added to that.
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
    """Denoiser (scale 1), ×2 super-resolver (scale 2) or transfer model (1, 2, 4), working at
    half the input's resolution."""

    def __init__(self, scale: int = 1, channels: int = 24, levels: int = 2, window: int = 1,
                 noise_map: bool = False, guided: bool = False, deconvolved: bool = False
                 ) -> None:
        super().__init__()
        if scale not in (1, 2, 4):
            raise ValueError(f"scale must be 1, 2 or 4, got {scale}")
        if deconvolved and not guided:
            raise ValueError("a deconvolved channel comes with a guide (guided=True)")
        self.scale, self.levels, self.window = scale, levels, window
        #: the channel the residual is added to: the newest frame, the classical estimate,
        #: or its deconvolution
        self.base_channel = window + int(deconvolved) if guided else window - 1
        widths = [channels * 2**i for i in range(levels + 1)]
        inputs = window + int(guided) + int(deconvolved) + int(noise_map)
        self.stem = _Block(4 * inputs, widths[0])
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
        newest = x[:, self.base_channel:self.base_channel + 1] if x.shape[1] > 1 else x
        base = newest if self.scale == 1 else F.interpolate(
            newest, scale_factor=float(self.scale), mode="bilinear", align_corners=False)
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
    if arch == "interp":
        return 4
    levels = int(hparams.get("levels", 2 if arch == "restore" else 3))
    return 2 ** (levels + 1) if arch == "restore" else 2**levels


def count_parameters(net: nn.Module) -> int:
    return sum(p.numel() for p in net.parameters())


class InterpNet(nn.Module):
    """Frame interpolation (RIFE-style, tiny): the frame at time t between two frames.

    Flows from the unknown frame back to both inputs and a fusion mask are
    estimated at quarter resolution (space-to-depth ×4), upsampled, used to
    backward-warp both frames (grid sampling), and blended; a small residual
    at quarter resolution, pixel-shuffled back, restores detail. `t` is a
    (1,1,1,1) tensor so one model serves factor 2 (t=0.5) and 4 (t=¼, ½, ¾).
    """

    def __init__(self, channels: int = 32, depth: int = 4) -> None:
        super().__init__()
        layers: list[nn.Module] = [_conv(2 * 16 + 1, channels), nn.ReLU(inplace=True)]
        for _ in range(depth):
            layers += [_conv(channels, channels), nn.ReLU(inplace=True)]
        self.body = nn.Sequential(*layers)
        self.flow = nn.Conv2d(channels, 5, 3, padding=1)  # 2 flows (4) + mask logit (1)
        self.residual = nn.Sequential(nn.Conv2d(channels, 16, 3, padding=1), nn.PixelShuffle(4))

    @staticmethod
    def _warp_both(frame0: torch.Tensor, frame1: torch.Tensor, flows: torch.Tensor
                   ) -> tuple[torch.Tensor, torch.Tensor]:
        """Backward-warp each frame by its flow (`flows`: frame0's then frame1's, in pixels).

        Both warps are one grid sampling over a batch of 2n images, the grid built channels
        first and transposed once: the same numbers as two samplings with channel-last
        grids stacked per flow, but OpenVINO ran that graph 2-3x slower (its full-resolution
        concatenations and two upsamplings dominated the convolutions)."""
        n, _, h, w = frame0.shape
        ys = torch.linspace(-1.0, 1.0, h, dtype=frame0.dtype, device=frame0.device)
        xs = torch.linspace(-1.0, 1.0, w, dtype=frame0.dtype, device=frame0.device)
        gy, gx = torch.meshgrid(ys, xs, indexing="ij")
        f = flows.reshape(2 * n, 2, h, w)
        # flow is in pixels; grid_sample wants [-1, 1] coordinates (align_corners=True), x
        # then y. (Scalars from the traced shape, not a tensor of them: that would be
        # frozen into the exported graph at the example's size.)
        grid = torch.cat((f[:, 0:1] * (2.0 / max(w - 1, 1)) + gx,
                          f[:, 1:2] * (2.0 / max(h - 1, 1)) + gy), dim=1).permute(0, 2, 3, 1)
        images = torch.stack((frame0, frame1), dim=1).reshape(2 * n, 1, h, w)
        warped = F.grid_sample(images, grid, mode="bilinear", padding_mode="border",
                               align_corners=True).reshape(n, 2, h, w)
        return warped[:, 0:1], warped[:, 1:2]

    def forward(self, frame0: torch.Tensor, frame1: torch.Tensor, t: torch.Tensor
                ) -> torch.Tensor:
        x = torch.cat([F.pixel_unshuffle(frame0, 4), F.pixel_unshuffle(frame1, 4)], dim=1)
        tmap = t.expand(x.shape[0], 1, x.shape[2], x.shape[3])
        h = self.body(torch.cat([x, tmap], dim=1))
        # Two flows (4 channels) and the mask logit, upsampled together.
        out = F.interpolate(self.flow(h), scale_factor=4.0, mode="bilinear",
                            align_corners=False)
        flow = out[:, :4] * 4.0
        mask = torch.sigmoid(out[:, 4:5])
        warped0, warped1 = self._warp_both(frame0, frame1, flow)
        return mask * warped0 + (1.0 - mask) * warped1 + self.residual(h)


_ARCHS["interp"] = InterpNet
