"""napari-leakseg: live-trained segmentation and restoration networks for napari.

The algorithm code (``napari_leakseg.core`` and the capability modules
``scribble``, ``membrane``, ``restore``, ``propagate``, ``zarr_io``) is plain
numpy/torch and never imports napari or Qt, so it runs from the CLI, from tests
and on dask workers. The napari integration lives in ``napari_leakseg._napari``.
"""

import os as _os

# torch's OpenMP worker threads spin-wait between parallel regions by default. When anything else
# wants the CPU (napari's GUI thread, another program), that spinning made our torch work 6-10x slower
# on 2 cores (benchmarks/bench_threads.py). Sleeping threads cost little when the machine is idle.
# Only takes effect if torch (its OpenMP runtime) is not loaded yet; an explicit setting wins.
_os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

__version__ = "0.1.0"

__all__ = ["__version__"]
