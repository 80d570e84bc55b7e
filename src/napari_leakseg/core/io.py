"""Read and write images/labels by extension: .tif/.tiff, .png/.jpg, .npy, .zarr.

``imread`` returns numpy for small files and a lazy dask array for ``.zarr``.
``imwrite`` never overwrites an existing path unless ``overwrite=True``, and
writes to a temporary name first, renaming when complete. ``content_digest`` names
array contents (cache keys).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np

from .errors import InputError
from .memory import check_array, check_file_read, quiet_logger as _quiet_logger
from .paths import check_input_file, check_store_files, check_target  # noqa: F401 (re-exported)

READ_EXT = (".tif", ".tiff", ".png", ".jpg", ".jpeg", ".npy", ".zarr")
WRITE_EXT = (".tif", ".tiff", ".png", ".npy", ".zarr")


def content_digest(*arrays) -> str:
    """A short hash of the arrays' shapes, dtypes and contents: equal data, equal digest (cache keys)."""
    import hashlib

    h = hashlib.blake2b(digest_size=16)
    for a in arrays:
        a = np.ascontiguousarray(a)
        h.update(f"{a.shape}{a.dtype}".encode())
        h.update(a.tobytes())
    return h.hexdigest()


def _ext(path) -> str:
    p = str(path).rstrip("/\\").lower()
    for e in (".ome.zarr", ".zarr", ".ome.tif", ".ome.tiff"):
        if p.endswith(e):
            return ".zarr" if "zarr" in e else ".tif"
    return os.path.splitext(p)[1]


def imread(path, lazy: bool = True, mmap: bool = False, prefer: str = "labels"):
    """Read an image or label file. ``.zarr`` gives a dask array (lazy) unless lazy=False.

    ``mmap``: memory-map ``.npy`` files (read-only; pages are loaded on access), so
    huge ``.npy`` inputs can be converted chunk by chunk. ``prefer``: for a zarr
    store holding both, return the ``"labels"`` (default) or the ``"image"`` array.
    """
    path = Path(path)
    ext = _ext(path)
    if not path.exists():
        raise InputError(f"input {path} does not exist")
    if ext not in READ_EXT:
        raise InputError(f"cannot read {path}: unsupported extension {ext!r} (use {', '.join(READ_EXT)})")
    if ext == ".zarr":
        from .zarr_io import read_zarr

        check_store_files(path)  # a FIFO posing as metadata would block the zarr reader

        arr = read_zarr(path, prefer=prefer)
        if lazy:
            return arr
        check_array(arr.shape, arr.dtype, f"reading {path.name} into memory (shape {tuple(arr.shape)}, {arr.dtype})")
        return np.asarray(arr)
    if path.is_dir():
        raise InputError(f"input {path} is a directory, not a {ext} file")
    check_input_file(path)  # a FIFO/device would block the reader forever
    if not (mmap and ext == ".npy"):
        check_file_read(path)  # refuse files far beyond memory before reading a pixel
    try:
        with _quiet_logger("tifffile"):  # its warnings would add lines to the CLI's stderr
            if ext in (".tif", ".tiff"):
                import tifffile

                arr = tifffile.imread(path)
            elif ext == ".npy":
                arr = np.load(path, allow_pickle=False, mmap_mode="r" if mmap else None)
            else:
                import imageio.v3 as iio

                arr = np.asarray(iio.imread(path))
    except Exception as e:
        raise InputError(f"cannot read {path}: {str(e).splitlines()[0][:200] if str(e) else type(e).__name__}") from None
    if getattr(arr, "size", 1) == 0 and len(getattr(arr, "shape", ())) <= 1:
        # e.g. a damaged TIFF whose page table points nowhere: tifffile returns an empty array
        raise InputError(f"cannot read {path}: no image data in the file (corrupt or truncated?)")
    return arr


def check_output_path(path, overwrite: bool = False, inputs=()) -> Path:
    """Raise a clear error for an output path with an unsupported extension, or one that
    :func:`check_target` refuses (exists, is or holds an input, folder missing/unwritable)."""
    path = Path(path)
    ext = _ext(path)
    if ext not in WRITE_EXT:
        raise InputError(f"cannot write {path}: unsupported extension {ext!r} (use {', '.join(WRITE_EXT)})")
    return check_target(path, overwrite, inputs)


def imwrite(path, data, overwrite: bool = False, kind: str = "labels", **zarr_kw) -> Path:
    """Write ``data`` atomically; ``kind`` ("labels" or "image") matters for .zarr and .png."""
    path = check_output_path(path, overwrite)
    ext = _ext(path)
    if ext == ".zarr":
        from .zarr_io import write_ome_zarr

        return write_ome_zarr(path, data, kind=kind, overwrite=overwrite, **zarr_kw)
    arr = np.asarray(data)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}{path.suffix}")
    try:
        if ext in (".tif", ".tiff"):
            import tifffile

            tifffile.imwrite(tmp, arr, compression="zlib")
        elif ext == ".npy":
            with open(tmp, "wb") as f:
                np.save(f, arr, allow_pickle=False)
        else:  # png
            import imageio.v3 as iio

            if arr.dtype.kind == "f":
                if kind == "labels":
                    raise InputError("PNG cannot hold float labels; use .tif, .npy or .zarr")
                arr = (np.clip(arr, 0, 1) * 255).round().astype(np.uint8)
            elif arr.dtype.kind in "iu" and arr.max(initial=0) > 65535:
                raise InputError("PNG holds at most 16-bit values; use .tif, .npy or .zarr")
            elif arr.dtype.kind in "iu" and arr.dtype.itemsize > 2:
                arr = arr.astype(np.uint16 if arr.max(initial=0) > 255 else np.uint8)
            iio.imwrite(tmp, arr, extension=".png")
        if overwrite and path.is_dir() and not path.is_symlink():
            # only a store we wrote gets here (check_target): move it aside, then replace
            old = path.with_name(f".{path.name}.old-{os.getpid()}")
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path
