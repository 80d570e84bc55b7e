"""napari-leakseg: live-trained segmentation and restoration networks for napari.

The algorithm code (``napari_leakseg.core`` and the capability modules
``scribble``, ``membrane``, ``restore``, ``propagate``, ``zarr_io``) is plain
numpy/torch and never imports napari or Qt, so it runs from the CLI, from tests
and on dask workers. The napari integration lives in ``napari_leakseg._napari``.
"""

__version__ = "0.1.0"

__all__ = ["__version__"]
