"""Names the command line needs before torch is imported (``leakseg --help`` stays fast)."""

from __future__ import annotations

#: the device choices every widget dropdown and ``--device`` accept; see ``core.device``
DEVICE_CHOICES = ("auto", "cuda", "mps", "cpu")
