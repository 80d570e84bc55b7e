"""A compact 2D U-Net shared by the capabilities (membrane, restore, propagate)."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn
import torch.nn.functional as F


def _norm(kind: str, ch: int) -> nn.Module:
    if kind == "batch":
        return nn.BatchNorm2d(ch)
    if kind == "group":
        return nn.GroupNorm(min(8, ch), ch)
    if kind == "instance":
        return nn.InstanceNorm2d(ch, affine=True)
    return nn.Identity()


class ConvBlock(nn.Sequential):
    def __init__(self, cin: int, cout: int, norm: str = "batch"):
        super().__init__(
            nn.Conv2d(cin, cout, 3, padding=1), _norm(norm, cout), nn.ReLU(inplace=True),
            nn.Conv2d(cout, cout, 3, padding=1), _norm(norm, cout), nn.ReLU(inplace=True),
        )


class UNet(nn.Module):
    """U-Net with ``depth`` poolings; inputs must be divisible by ``2**depth``.

    ``forward`` returns ``out_channels`` maps; ``features`` returns the last
    decoder features (``base`` channels, full resolution) for heads that need them.

    The default BatchNorm uses running statistics in eval mode, so prediction is
    local and tiled inference matches untiled inference. GroupNorm/InstanceNorm
    normalise over the whole input and break that equality; avoid them for
    models that are applied tiled.
    """

    def __init__(self, in_channels: int = 1, out_channels: int = 1, base: int = 16,
                 depth: int = 3, norm: str = "batch"):
        super().__init__()
        self.arch = dict(in_channels=in_channels, out_channels=out_channels, base=base,
                         depth=depth, norm=norm)
        self.depth = depth
        chs = [base * 2 ** i for i in range(depth + 1)]
        self.down = nn.ModuleList([ConvBlock(in_channels, chs[0], norm)] +
                                  [ConvBlock(chs[i], chs[i + 1], norm) for i in range(depth)])
        self.up = nn.ModuleList([nn.ConvTranspose2d(chs[i + 1], chs[i], 2, stride=2)
                                 for i in reversed(range(depth))])
        self.dec = nn.ModuleList([ConvBlock(2 * chs[i], chs[i], norm) for i in reversed(range(depth))])
        self.head = nn.Conv2d(chs[0], out_channels, 1)

    @property
    def multiple(self) -> int:
        return 2 ** self.depth

    def features(self, x: torch.Tensor) -> torch.Tensor:
        skips = []
        for i, blk in enumerate(self.down):
            x = blk(x)
            if i < self.depth:
                skips.append(x)
                x = F.max_pool2d(x, 2)
        for up, dec in zip(self.up, self.dec):
            x = up(x)
            x = dec(torch.cat([x, skips.pop()], 1))
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def numpy_fn(model: nn.Module, device, multiple: int = 1, activation=None):
    """Wrap a torch model as a numpy (C, h, w) → (C_out, h, w) function for the tiler.

    Pads to ``multiple`` with reflection and crops back; runs in eval/no-grad mode.
    """
    from .tiling import pad_to_multiple

    def fn(tile: np.ndarray) -> np.ndarray:
        x, (h, w) = pad_to_multiple(np.asarray(tile, np.float32), multiple)
        with torch.no_grad():
            t = torch.from_numpy(np.ascontiguousarray(x))[None].to(device)
            y = model(t)
            if activation is not None:
                y = activation(y)
        return y[0, :, :h, :w].float().cpu().numpy()

    return fn
