"""OME-Zarr export and lazy reading: moved to :mod:`napari_leakseg.core.zarr_io`.

``core.io`` reads and writes ``.zarr`` through it, and ``core`` never imports a
capability-level module, so the implementation lives in ``core``. This name stays
as an alias of the same module object (``napari_leakseg.zarr_io is
napari_leakseg.core.zarr_io``), so existing imports and monkeypatches keep working.
"""

import sys as _sys

from .core import zarr_io as _impl

_sys.modules[__name__] = _impl
