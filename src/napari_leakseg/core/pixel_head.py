"""A small per-pixel classifier fitted in seconds to the labelled pixels of feature maps.

Used at prediction time to read annotated examples the way a user's pixel classifier
(ilastik's random forest) does, but differentiable and on the chosen device: an MLP
(F → hidden → hidden → 1) on standardised features, trained with binary cross-entropy
on random batches of the labelled pixels. Unlabelled pixels (NaN targets) are ignored.

Plain torch; nothing here imports a capability module, napari or Qt.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from .errors import InputError

__all__ = ["PixelHead"]


class PixelHead:
    """``fit(features, targets)`` on (F, Y, X) feature maps with (Y, X) float targets in [0, 1]
    (NaN = unlabelled); ``predict(features)`` → (Y, X) probability tensor."""

    def __init__(self, hidden: int = 32, steps: int = 200, batch: int = 8192, lr: float = 1e-2, seed: int = 0):
        self.hidden, self.steps, self.batch, self.lr, self.seed = int(hidden), int(steps), int(batch), float(lr), int(seed)
        self.net = None
        self.mean = self.std = None

    def fit(self, features: Sequence[torch.Tensor], targets: Sequence[torch.Tensor]) -> "PixelHead":
        xs, ys = [], []
        for f, t in zip(features, targets):
            if tuple(f.shape[1:]) != tuple(t.shape):
                raise InputError(f"features {tuple(f.shape[1:])} and labels {tuple(t.shape)} differ in shape")
            t = t.reshape(-1).float()
            keep = ~torch.isnan(t)
            xs.append(f.reshape(f.shape[0], -1).T[keep])
            ys.append(t[keep])
        x, y = torch.cat(xs), torch.cat(ys)
        if len(y) == 0:
            raise InputError("no labelled pixels to fit the reference head to")
        self.mean, self.std = x.mean(0), x.std(0) + 1e-6
        x = (x - self.mean) / self.std
        gen = torch.Generator(device="cpu").manual_seed(self.seed)
        torch_state = torch.random.get_rng_state()
        torch.manual_seed(self.seed)  # the weights' initialisation, without touching the caller's stream
        self.net = nn.Sequential(nn.Linear(x.shape[1], self.hidden), nn.ReLU(), nn.Linear(self.hidden, self.hidden),
                                 nn.ReLU(), nn.Linear(self.hidden, 1)).to(x.device)
        torch.random.set_rng_state(torch_state)
        opt = torch.optim.Adam(self.net.parameters(), self.lr)
        for _ in range(self.steps):
            idx = torch.randint(0, len(y), (min(self.batch, len(y)),), generator=gen).to(x.device)
            loss = F.binary_cross_entropy_with_logits(self.net(x[idx])[:, 0], y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
        self.net.eval()
        return self

    @torch.no_grad()
    def predict(self, f: torch.Tensor) -> torch.Tensor:
        """(F, Y, X) features → (Y, X) probability. The standardisation is folded into the first
        layer and the layers run channels-first (no copy of the features: about 2× faster)."""
        if self.net is None:
            raise RuntimeError("PixelHead.predict before fit")
        l1, l2, l3 = self.net[0], self.net[2], self.net[4]
        w1 = l1.weight / self.std
        b1 = l1.bias - w1 @ self.mean
        x = torch.relu(torch.addmm(b1[:, None], w1, f.reshape(f.shape[0], -1)))
        x = torch.relu(torch.addmm(l2.bias[:, None], l2.weight, x))
        return torch.sigmoid(torch.addmm(l3.bias[:, None], l3.weight, x))[0].reshape(f.shape[1:])
