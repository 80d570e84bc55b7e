"""Run any saved model over a large array with dask, block by block (``leakseg apply``).

How it works
------------
* The input (OME-Zarr, plain zarr, or any file ``core.io`` reads) is opened
  lazily as a dask array. Leading axes (Z, T, ...) are independent 2D planes;
  a channel axis (NGFF ``c``) feeds the model's input channels.
* The plane is cut into blocks of ``block`` pixels (a multiple of the output
  zarr chunk) and ``dask.array.map_overlap`` hands each block to a worker
  together with a halo of neighbouring pixels.
* Each worker loads the model once (``core.predictor.load_predictor``), runs
  the shared tiler ``core.tiling.predict_tiled`` on the block + halo, crops the
  halo, applies ``predictor.finalize`` and writes the block **straight into the
  output zarr** (blocks are chunk-aligned, so no locks).
* The output is written under a hidden temporary name; the OME-Zarr metadata is
  written and the store renamed to its final name only after every block has
  succeeded. A failed, cancelled or killed run never leaves a store that looks
  complete.

Identical to single-process prediction
--------------------------------------
The single-process reference (:func:`predict_array`) is, per plane::

    predictor.finalize(predict_tiled(predictor.fn, plane, tile=predictor.tile,
                                     overlap=predictor.halo, preprocess=pre))

with ``pre`` the predictor's own ``preprocess`` or percentile normalisation
with percentiles taken once over the whole input. The blockwise path gives
*bit-identical* output because each block re-runs exactly the global tiles that
touch it (same positions, same blending weights, same summation order), not a
fresh tiling of the block. That needs a halo (``map_overlap`` depth) of up to
one tile rather than ``predictor.halo``: the depth is the smallest value that
makes every block's tiles coincide with the global tiling (see
:func:`plan_blocks`). The price is recomputing the tiles that straddle block
borders (~(1 + tile/block)² more model evaluations).
"""

from __future__ import annotations

import inspect
import math
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np

from .core.errors import InputError, JobCancelled, LeaksegError, MemoryEstimateError, ModelFileError
from .core.jobs import DeadlineExceeded, Progress, call_with_deadline, check_timeout, run_job
from .core.tiling import predict_tiled, tile_starts

__all__ = [
    "apply_model",
    "iter_apply",
    "predict_array",
    "plan_blocks",
    "estimate_memory",
    "open_input",
]

#: default block edge (pixels) per worker task and output zarr chunk edge
DEFAULT_BLOCK = 2048
DEFAULT_CHUNK = 512
#: seconds to wait for a scheduler address before giving up
def _env_seconds(name: str, default: float) -> float:
    """A positive number of seconds from the environment; the default when unset or unusable."""
    try:
        v = float(os.environ.get(name, default))
    except ValueError:
        return float(default)
    return v if math.isfinite(v) and v > 0 else float(default)


DEFAULT_CONNECT_TIMEOUT = _env_seconds("LEAKSEG_CONNECT_TIMEOUT", 5.0)
#: seconds a cluster may go without finishing any block before the run is abandoned
DEFAULT_BLOCK_TIMEOUT = _env_seconds("LEAKSEG_BLOCK_TIMEOUT", 3600.0)


# --------------------------------------------------------------------------- #
# model loading (on the client and, cached, on every worker)
# --------------------------------------------------------------------------- #
_CACHE: dict = {}
_CACHE_LOCK = threading.Lock()


def _factory_for(model_path) -> str:
    """The "module:function" that builds a Predictor for this model (resolved on the client,
    so workers use the same factory even when it was registered at runtime)."""
    from .core import predictor as _pred
    from .core import store

    meta = store.read_metadata(model_path)
    cap = meta.get("capability")
    target = _pred.PREDICTOR_FACTORIES.get(cap)
    if target is None:
        from .core.errors import ModelFileError

        raise ModelFileError(f"{model_path}: unknown capability {cap!r}")
    return target


def _load(model_path: str, device: str, factory: str, torch_threads: Optional[int] = None):
    """Load (once per process) the Predictor for a model file."""
    import importlib

    key = (str(model_path), os.path.getmtime(model_path), str(device), factory)
    with _CACHE_LOCK:
        pred = _CACHE.get(key)
        if pred is None:
            if torch_threads:
                import torch

                torch.set_num_threads(int(torch_threads))
            from .core import store

            sd, meta = store.load(model_path)
            mod, fn = factory.split(":")
            try:
                pred = getattr(importlib.import_module(mod), fn)(sd, meta, device=device)
            except ModelFileError as e:
                raise ModelFileError(f"{model_path}: {e}") from None
            _CACHE.clear()  # one model per process
            _CACHE[key] = pred
    return pred


# --------------------------------------------------------------------------- #
# input layout
# --------------------------------------------------------------------------- #
@dataclass
class InputInfo:
    array: Any                    # dask array, channel axis moved to -3 when present
    axes: list                    # axis names of ``array``
    scale: list                   # pixel size per axis of ``array``
    channel_axis: Optional[int]   # axis of the original array holding channels
    name: str
    path: str


def open_input(path, in_channels: int = 1) -> InputInfo:
    """Open the model input lazily and put its channel axis (if any) at -3.

    Raises :class:`InputError` naming the problem for a missing/corrupt store or
    an array whose dims do not fit a model with ``in_channels`` input channels.
    """
    import dask.array as da

    from .core.io import _ext, imread
    from .core.zarr_io import read_zarr_with_meta

    path = Path(path)
    if not path.exists():
        raise InputError(f"input {path} does not exist")
    if _ext(path) == ".zarr":
        arr, meta, _ = read_zarr_with_meta(path, prefer="image")
        axes = list(meta.get("metadata", {}).get("axes") or [])
        scale = list(meta.get("scale") or [])
    else:
        arr = imread(path, lazy=True, mmap=True)
        arr = da.from_array(arr, chunks=tuple(min(s, 1 if i < arr.ndim - 2 else DEFAULT_BLOCK)
                                              for i, s in enumerate(arr.shape)))
        axes, scale = [], []
    if arr.ndim < 2:
        raise InputError(f"input {path} has {arr.ndim} dims (shape {arr.shape}); the model needs 2D planes (Y, X)")
    if len(axes) != arr.ndim:
        axes = list({2: "yx", 3: "zyx", 4: "tzyx", 5: "tczyx"}.get(arr.ndim, "")) or \
            [f"d{i}" for i in range(arr.ndim - 2)] + ["y", "x"]
    if len(scale) != arr.ndim:
        scale = [1.0] * arr.ndim
    dt = np.dtype(arr.dtype)
    if dt.kind not in "biuf":
        raise InputError(f"input {path} has unsupported dtype {dt}")
    if 0 not in arr.shape:
        from .core.normalize import check_image

        check_image(arr, name=f"input {path}")  # NaN/Inf (a strided subsample for huge inputs)
    cax = axes.index("c") if "c" in axes else None
    if in_channels > 1:
        if cax is None:
            if arr.ndim >= 3 and arr.shape[-3] == in_channels:
                cax = arr.ndim - 3
            elif arr.ndim == 3 and arr.shape[-1] == in_channels:
                cax = arr.ndim - 1  # (Y, X, C) e.g. RGB
        if cax is None or arr.shape[cax] != in_channels:
            raise InputError(
                f"the model expects {in_channels} input channels but input {path} has shape "
                f"{tuple(arr.shape)} (axes {''.join(axes)}); give it a channel axis 'c' of size {in_channels}")
    elif cax is not None and arr.shape[cax] != 1:
        raise InputError(
            f"the model expects 1 input channel but input {path} has {arr.shape[cax]} channels "
            f"(axes {''.join(axes)}); export one channel first")
    if cax is not None and arr.ndim < 3:
        raise InputError(f"input {path} has shape {tuple(arr.shape)}: no spatial Y, X axes")
    if cax is not None:
        arr = da.moveaxis(arr, cax, -3)
        axes = axes[:cax] + axes[cax + 1:]
        axes = axes[:-2] + ["c"] + axes[-2:]
        sc = scale[:cax] + scale[cax + 1:]
        scale = sc[:-2] + [scale[cax]] + sc[-2:]
    if min(arr.shape[-2:]) < 1:
        raise InputError(f"input {path} is empty (shape {tuple(arr.shape)})")
    return InputInfo(arr, axes, scale, cax, path.name.split(".")[0], str(path))


# --------------------------------------------------------------------------- #
# block plan
# --------------------------------------------------------------------------- #
@dataclass
class AxisPlan:
    n: int                     # axis length
    tile: int                  # tile edge along this axis (clipped to n)
    halo: int
    chunks: tuple              # core block sizes
    depth: int                 # map_overlap depth along this axis
    zchunk: int                # output zarr chunk edge


def _axis_plan(n: int, tile: int, halo: int, block: int, zchunk: int) -> AxisPlan:
    th = min(int(tile), n)
    zchunk = max(1, min(int(zchunk), n))
    block = max(int(block), th, zchunk)
    block = int(math.ceil(block / zchunk) * zchunk)      # blocks are whole zarr chunks
    if block >= n:
        return AxisPlan(n, th, halo, (n,), 0, zchunk)
    bounds = list(range(0, n, block)) + [n]
    starts = tile_starts(n, th, halo)
    # the smallest halo for which every block's global tiles lie inside block + halo
    def need(c0, c1):
        a = next(i for i, s in enumerate(starts) if s + th > c0)
        b = max(i for i, s in enumerate(starts) if s < c1)
        return c0 - starts[a], starts[b] + th - c1

    def depth_for(bounds):
        d = 0
        for c0, c1 in zip(bounds[:-1], bounds[1:]):
            lo, hi = need(c0, c1)
            d = max(d, lo if c0 > 0 else 0, hi if c1 < n else 0)
        return d

    depth = depth_for(bounds)
    # map_overlap needs every block at least as large as the depth: merge a short tail
    while len(bounds) > 2 and bounds[-1] - bounds[-2] < depth:
        bounds.pop(-2)
        depth = depth_for(bounds)
    chunks = [b - a for a, b in zip(bounds[:-1], bounds[1:])]
    if len(chunks) == 1:
        depth = 0
    return AxisPlan(n, th, halo, tuple(chunks), depth, zchunk)


@dataclass
class BlockPlan:
    y: AxisPlan
    x: AxisPlan
    lead_shape: tuple          # shape of the leading (plane) axes
    in_channels: int
    out_shape: tuple           # full output shape
    out_chunks: tuple          # output zarr chunks
    out_dtype: Any
    out_channels: int          # K channels in the finalized output (0 = none)
    n_blocks: int = 0
    extras: dict = field(default_factory=dict)


def _probe_finalize(pred) -> tuple[np.dtype, int]:
    """Output dtype and channel count of ``finalize``, probed on a tiny block where each
    model channel wins once (so argmax-style outputs show their full value range)."""
    C = int(pred.out_channels)
    probe = np.zeros((C, 1, C + 1), np.float32)
    for i in range(C):
        probe[i, 0, i] = 1.0
    res = np.asarray(pred.finalize(probe))
    if res.ndim == 2:
        k = 0
    elif res.ndim == 3:
        k = res.shape[0]
    else:
        raise LeaksegError(f"model finalize returned {res.ndim} dims for a 2D block")
    dt = res.dtype
    if pred.output == "labels" and dt.kind in "iu" and dt.itemsize < 4:
        # content-dependent smallest-uint finalizers: fix a dtype wide enough for all blocks
        dt = np.dtype(np.uint32) if int(res.max(initial=0)) > np.iinfo(np.uint16).max else np.dtype(
            np.uint16 if int(res.max(initial=0)) > 255 else np.uint8)
        dt = np.promote_types(dt, res.dtype)
    if dt == np.float64:
        dt = np.dtype(np.float32)
    return np.dtype(dt), k


def plan_blocks(shape: Sequence[int], pred, *, block: int = DEFAULT_BLOCK,
                chunk: int = DEFAULT_CHUNK, has_channels: bool = False) -> BlockPlan:
    """Block layout, map_overlap depth and output layout for an input of ``shape``
    (channel axis, if any, at -3)."""
    shape = tuple(int(s) for s in shape)
    Y, X = shape[-2:]
    lead = shape[:-3] if has_channels else shape[:-2]
    cin = shape[-3] if has_channels else 1
    py = _axis_plan(Y, pred.tile, pred.halo, block, chunk)
    px = _axis_plan(X, pred.tile, pred.halo, block, chunk)
    dt, k = _probe_finalize(pred)
    out_shape = lead + ((k,) if k else ()) + (Y, X)
    out_chunks = (1,) * len(lead) + ((k,) if k else ()) + (py.zchunk, px.zchunk)
    n_blocks = int(np.prod(lead, dtype=np.int64)) * len(py.chunks) * len(px.chunks)
    return BlockPlan(py, px, lead, cin, out_shape, out_chunks, dt, k, n_blocks)


# --------------------------------------------------------------------------- #
# the per-block work (runs on the workers)
# --------------------------------------------------------------------------- #
def _make_preprocess(pred, lohi):
    from .core.normalize import normalize

    if pred.preprocess is None:
        return lambda t: normalize(t, lohi=lohi)
    try:
        if "lohi" in inspect.signature(pred.preprocess).parameters:
            return lambda t: pred.preprocess(t, lohi=lohi)
    except (TypeError, ValueError):  # pragma: no cover - builtins
        pass
    return pred.preprocess


def _tile_range(starts, th, c0, c1):
    a = next(i for i, s in enumerate(starts) if s + th > c0)
    b = max(i for i, s in enumerate(starts) if s < c1)
    return starts[a], starts[b] + th


def _predict_region(pred, plane, ext0y, ext0x, cy, cx, ply: AxisPlan, plx: AxisPlan, pre):
    """Predict the core ``cy × cx`` (global [c0, c1) ranges) of a plane given the block plus
    halo ``plane`` (C, h, w) whose top-left is at global (ext0y, ext0x)."""
    sy = tile_starts(ply.n, ply.tile, ply.halo)
    sx = tile_starts(plx.n, plx.tile, plx.halo)
    r0y, r1y = _tile_range(sy, ply.tile, *cy)
    r0x, r1x = _tile_range(sx, plx.tile, *cx)
    if r0y < ext0y or r0x < ext0x or r1y > ext0y + plane.shape[-2] or r1x > ext0x + plane.shape[-1]:
        raise RuntimeError("internal error: block halo too small for the global tiling")  # pragma: no cover
    region = plane[:, r0y - ext0y:r1y - ext0y, r0x - ext0x:r1x - ext0x]
    blended = predict_tiled(pred.fn, region, tile=(ply.tile, plx.tile), overlap=pred.halo,
                            out_channels=pred.out_channels, preprocess=pre)
    core = blended[:, cy[0] - r0y:cy[1] - r0y, cx[0] - r0x:cx[1] - r0x]
    return np.asarray(pred.finalize(core))


def _cast_out(res, dtype):
    dtype = np.dtype(dtype)
    if res.dtype != dtype:
        if dtype.kind in "iu" and res.size and (res.min() < np.iinfo(dtype).min or res.max() > np.iinfo(dtype).max):
            raise LeaksegError(f"model output value {res.max()} does not fit {dtype}")
        res = res.astype(dtype)
    return res


def _block_task(block, *, spec: dict, block_info=None):
    """map_overlap function: predict one block (+ halo), write it to the output zarr,
    return a tiny marker array."""
    import zarr

    pred = _load(spec["model"], spec["device"], spec["factory"], spec.get("torch_threads"))
    ply, plx = spec["ply"], spec["plx"]
    nlead = spec["nlead"]
    loc = block_info[0]["chunk-location"]
    iy, ix = loc[-2], loc[-1]
    lead_idx = tuple(block_info[0]["array-location"][i][0] for i in range(nlead))
    cy0 = int(sum(ply.chunks[:iy])); cy1 = cy0 + ply.chunks[iy]
    cx0 = int(sum(plx.chunks[:ix])); cx1 = cx0 + plx.chunks[ix]
    ext0y = cy0 - (ply.depth if iy > 0 else 0)
    ext0x = cx0 - (plx.depth if ix > 0 else 0)
    b = np.asarray(block)
    if not spec["has_channels"]:
        b = b[..., None, :, :]
    pre = _make_preprocess(pred, spec["lohi"])
    lead_shape = b.shape[:nlead]
    out = None
    for li in np.ndindex(*lead_shape):
        res = _predict_region(pred, b[li], ext0y, ext0x, (cy0, cy1), (cx0, cx1), ply, plx, pre)
        res = _cast_out(res, spec["dtype"])
        if out is None:
            out = np.zeros(lead_shape + res.shape, res.dtype)
        out[li] = res
    kslice = (slice(None),) if spec["k"] else ()
    region = tuple(slice(s, s + n) for s, n in zip(lead_idx, lead_shape)) + kslice + \
        (slice(cy0, cy1), slice(cx0, cx1))
    arr = zarr.open_array(store=spec["store"], path=spec["array_path"], mode="r+", zarr_format=2)
    arr[region] = out
    if spec.get("fault"):  # test hook: simulate a worker crash after a block
        _maybe_fault(spec["fault"])
    return np.ones((1,) * block.ndim, np.uint8)


def _maybe_fault(fault: dict) -> None:
    """Testing aid: kill this worker process (``os._exit``) according to ``fault``."""
    marker = fault.get("once_marker")
    if marker:
        try:
            fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            os.close(fd)
        except FileExistsError:
            return
    os._exit(1)


# --------------------------------------------------------------------------- #
# memory
# --------------------------------------------------------------------------- #
def estimate_memory(plan: BlockPlan, pred, in_itemsize: int = 4) -> dict:
    """Rough peak bytes per running task and per worker process.

    Per task: the block + halo as read, its float32 region, the blended
    (C_out, h, w) float32 output, the tiler's row band, one tile's activations
    (~64 feature maps of the tile size) and the finalized block. Per worker add
    ~450 MB for Python + torch + dask.
    """
    hy = plan.y.chunks[0] + 2 * plan.y.depth
    hx = plan.x.chunks[0] + 2 * plan.x.depth
    ext = min(hy, plan.y.n) * min(hx, plan.x.n)
    cin, cout = plan.in_channels, int(pred.out_channels)
    task = (ext * cin * (in_itemsize + 4)            # block read + float region
            + ext * cout * 4                          # blended output
            + 2 * cout * plan.y.tile * min(hx, plan.x.n) * 4   # tiler band + weights
            + 64 * plan.y.tile * plan.x.tile * 4 * 2  # activations (fwd, no grad)
            + plan.y.chunks[0] * plan.x.chunks[0] * 8)
    return {"per_task_bytes": int(task), "per_worker_overhead_bytes": 450 * 2 ** 20}


def _check_memory(est: dict, n_tasks_parallel: int, n_procs: int, limit: Optional[float]) -> int:
    need = est["per_task_bytes"] * n_tasks_parallel + est["per_worker_overhead_bytes"] * n_procs
    if limit is not None and need > limit:
        raise MemoryEstimateError(
            f"this run needs about {need / 2**30:.1f} GiB ({n_tasks_parallel} blocks at "
            f"{est['per_task_bytes'] / 2**20:.0f} MiB in parallel) but only "
            f"{limit / 2**30:.1f} GiB is available; use a smaller --block or fewer --workers")
    return need


# --------------------------------------------------------------------------- #
# single-process reference
# --------------------------------------------------------------------------- #
def _input_lohi(pred, arr):
    from .core.normalize import percentile_range

    if pred.preprocess is not None and "lohi" not in _params(pred.preprocess):
        return None
    norm = (pred.metadata or {}).get("normalization", {}) or {}
    low, high = float(norm.get("low", 1.0)), float(norm.get("high", 99.8))
    return percentile_range(arr, low, high)


def _params(f):
    try:
        return inspect.signature(f).parameters
    except (TypeError, ValueError):  # pragma: no cover
        return {}


def predict_array(pred, image, *, has_channels: bool = False, lohi=None) -> np.ndarray:
    """The single-process reference: per 2D plane, ``finalize(predict_tiled(fn, plane,
    tile=pred.tile, overlap=pred.halo, preprocess=pre))``; planes are the leading axes
    (channel axis at -3 when ``has_channels``). ``lohi`` defaults to percentiles over
    the whole ``image``. :func:`apply_model` output is bit-identical to this."""
    image = np.asarray(image)
    if lohi is None:
        lohi = _input_lohi(pred, image)
    pre = _make_preprocess(pred, lohi)
    x = image if has_channels else image[..., None, :, :]
    lead = x.shape[:-3]
    dt, _ = _probe_finalize(pred)
    out = None
    Y, X = x.shape[-2:]
    for li in np.ndindex(*lead):
        blended = predict_tiled(pred.fn, x[li], tile=(min(pred.tile, Y), min(pred.tile, X)),
                                overlap=pred.halo, out_channels=pred.out_channels, preprocess=pre)
        res = _cast_out(np.asarray(pred.finalize(blended)), dt)
        if out is None:
            out = np.zeros(lead + res.shape, res.dtype)
        out[li] = res
    return out


# --------------------------------------------------------------------------- #
# scheduler / client
# --------------------------------------------------------------------------- #
#: environment of LocalCluster worker processes. distributed's default also sets
#: MALLOC_TRIM_THRESHOLD_=65536, which disables glibc's dynamic mmap threshold and
#: made torch convolutions ~3x slower in workers (measured: 1024² tile pass
#: 5.9 s vs 2.1 s); we leave it out. Users of their own clusters: see docs/export.md.
LOCAL_WORKER_ENV = {"OMP_NUM_THREADS": 1, "MKL_NUM_THREADS": 1, "OPENBLAS_NUM_THREADS": 1}


def _connect(scheduler, n_workers: int, threads_per_worker: int, processes: bool,
             connect_timeout: float, allowed_failures: int):
    """Returns (client, cluster_or_None). ``scheduler`` is "local" or an address."""
    import dask
    from distributed import Client, LocalCluster

    if _is_client(scheduler):
        return scheduler, None
    if scheduler == "local":
        with dask.config.set({"distributed.scheduler.allowed-failures": int(allowed_failures),
                              "distributed.worker.daemon": False,
                              "distributed.nanny.pre-spawn-environ": LOCAL_WORKER_ENV}):
            cluster = LocalCluster(n_workers=n_workers, threads_per_worker=threads_per_worker,
                                   processes=processes, dashboard_address=None,
                                   silence_logs=50, memory_limit=0)
            client = Client(cluster, set_as_default=False)
        return client, cluster
    addr = str(scheduler)
    deadline = time.monotonic() + connect_timeout  # one total deadline: TCP, handshake, client
    _probe_tcp(addr, connect_timeout)
    _handshake(addr, max(0.1, deadline - time.monotonic()), connect_timeout)
    err = None
    left = max(0.5, deadline - time.monotonic())
    try:
        client = call_with_deadline(lambda: Client(addr, timeout=f"{left}s", set_as_default=False), left + 1.0,
                                    "leakseg-dask-connect")
    except DeadlineExceeded:
        err = (f"the dask scheduler at {addr} did not finish the connection within {connect_timeout:g} s "
               "(--connect-timeout); check that it is a running dask scheduler")
    except (OSError, TimeoutError, ValueError) as e:
        err = (f"cannot reach the dask scheduler at {addr} within {connect_timeout:g} s "
               f"({str(e).splitlines()[0][:160] if str(e) else type(e).__name__}); "
               "check the address and that the scheduler is running")
    except Exception as e:  # other connection failures (bad protocol, not a dask scheduler...)
        err = (f"cannot connect to the dask scheduler at {addr}: "
               f"{str(e).splitlines()[0][:160] if str(e) else type(e).__name__}")
    if err is not None:
        _quiet_gc()  # a half-built Client complains from __del__; keep stderr to one line
        raise LeaksegError(err)
    return client, None


def _handshake(addr: str, timeout: float, shown: Optional[float] = None) -> None:
    """Ask the peer at ``addr`` who it is (dask's "identity" call) under a total deadline: a
    server that accepts the connection and never answers (or answers something else) is
    refused in ``timeout`` seconds instead of hanging the client forever."""
    import asyncio

    from distributed.comm import connect

    async def ask():
        comm = await connect(addr, timeout=timeout)
        try:
            await comm.write({"op": "identity"})
            return await comm.read()
        finally:
            comm.abort()

    def run():
        return asyncio.run(asyncio.wait_for(ask(), timeout))

    try:
        reply = call_with_deadline(run, timeout + 1.0, "leakseg-dask-handshake")
    except (DeadlineExceeded, asyncio.TimeoutError, TimeoutError):
        raise LeaksegError(f"the server at {addr} accepted the connection but did not answer as a dask "
                           f"scheduler within {shown or timeout:g} s (--connect-timeout); check the address") from None
    except (OSError, ValueError, TypeError) as e:
        raise LeaksegError(f"cannot connect to the dask scheduler at {addr}: "
                           f"{' '.join(str(e).split())[:160] or type(e).__name__}") from None
    except Exception as e:  # a peer speaking another protocol: garbage frames
        raise LeaksegError(f"the server at {addr} is not a dask scheduler "
                           f"({type(e).__name__}: {' '.join(str(e).split())[:120]})") from None
    if not isinstance(reply, dict) or reply.get("type") != "Scheduler":
        raise LeaksegError(f"the server at {addr} is not a dask scheduler (it answered {str(reply)[:80]!r})")


def _probe_tcp(addr: str, timeout: float) -> None:
    """Fail fast (and clearly) when a tcp:// scheduler address does not accept connections."""
    import socket

    if not addr.startswith("tcp://"):
        return
    hostport = addr[len("tcp://"):].split("/")[0]
    host, _, port = hostport.rpartition(":")
    try:
        port_i = int(port)
    except ValueError:
        raise LeaksegError(f"bad dask scheduler address {addr!r}; expected tcp://HOST:PORT") from None
    host = host.strip("[]") or "127.0.0.1"
    try:
        with socket.create_connection((host, port_i), timeout=timeout):
            pass
    except OSError as e:
        raise LeaksegError(f"cannot reach the dask scheduler at {addr} within {timeout:g} s "
                           f"({e.strerror or type(e).__name__}); check the address and that the "
                           "scheduler is running") from None


def _quiet_gc() -> None:
    import gc
    import sys

    hook = sys.unraisablehook
    sys.unraisablehook = lambda *a: None
    try:
        gc.collect()
    finally:
        sys.unraisablehook = hook


def _is_client(obj) -> bool:
    try:
        from distributed import Client
    except ImportError:  # pragma: no cover
        return False
    return isinstance(obj, Client)


def _worker_memory_limit(client) -> Optional[float]:
    try:
        info = client.scheduler_info()
        lims = [w.get("memory_limit") or 0 for w in info.get("workers", {}).values()]
        lims = [l for l in lims if l]
        return float(min(lims)) if lims else None
    except Exception:  # pragma: no cover
        return None


# --------------------------------------------------------------------------- #
# the job
# --------------------------------------------------------------------------- #
def iter_apply(model_path, input_path, output_path, *, scheduler=None, n_workers: Optional[int] = None,
               overwrite: bool = False, device: str = "cpu", block: int = DEFAULT_BLOCK,
               chunk: int = DEFAULT_CHUNK, threads_per_worker: int = 1, processes: bool = True,
               connect_timeout: float = DEFAULT_CONNECT_TIMEOUT, allowed_failures: int = 2,
               name: Optional[str] = None, memory_limit: Optional[float] = "auto",
               torch_threads: Optional[int] = None, block_timeout: float = DEFAULT_BLOCK_TIMEOUT, _fault=None):
    """Job generator behind :func:`apply_model`; yields one :class:`Progress` per block
    and returns the output path. Cancelling removes the partial output."""
    import dask

    from .core.device import resolve_device
    from .core.zarr_io import check_store_path, create_level0, discard_stage, finish_store, stage_store

    t0 = time.perf_counter()
    connect_timeout = check_timeout(connect_timeout, "connect timeout (--connect-timeout)")
    block_timeout = check_timeout(block_timeout, "block timeout")
    model_path, output_path = str(Path(model_path).resolve()), Path(output_path)
    if scheduler not in (None, "local") and not isinstance(scheduler, str) and not _is_client(scheduler):
        raise InputError(f"scheduler must be None, 'local', an address or a distributed.Client, got {scheduler!r}")
    inputs = [model_path] + ([input_path] if isinstance(input_path, (str, os.PathLike)) else [])
    check_store_path(output_path, overwrite, inputs)    # fail fast, before any work
    if str(device) != "cpu":
        resolve_device(device)                          # clear error for a missing GPU
    factory = _factory_for(model_path)
    pred = _load(model_path, str(device), factory)
    info = open_input(input_path, pred.in_channels)
    has_c = "c" in info.axes
    plan = plan_blocks(info.array.shape, pred, block=block, chunk=chunk, has_channels=has_c)
    n_workers = int(n_workers or max(1, (os.cpu_count() or 1) // max(1, threads_per_worker)))
    lohi = _input_lohi(pred, info.array)

    # dask input: planes of (C,) by × bx blocks, read straight from the store
    lead_n = len(plan.lead_shape)
    in_chunks = (1,) * lead_n + ((plan.in_channels,) if has_c else ()) + (plan.y.chunks, plan.x.chunks)
    arr = info.array.rechunk(in_chunks)
    depth = {arr.ndim - 2: plan.y.depth, arr.ndim - 1: plan.x.depth}
    out_name = name or (pred.capability or "output")

    client = cluster = None
    tmp = stage_store(output_path, overwrite, inputs)
    try:
        zarr_arr = create_level0(tmp, plan.out_shape, plan.out_dtype,
                                 kind=pred.output if pred.output in ("labels", "image") else "image",
                                 name=out_name, chunks=plan.out_chunks)
        array_path = zarr_arr.path
        spec = dict(model=model_path, device=str(device), factory=factory, ply=plan.y, plx=plan.x,
                    nlead=lead_n, has_channels=has_c, lohi=lohi, dtype=plan.out_dtype.str,
                    k=plan.out_channels, store=str(tmp), array_path=array_path, fault=_fault,
                    torch_threads=None)
        if scheduler is not None:
            client, cluster = _connect(scheduler, n_workers, threads_per_worker, processes,
                                       connect_timeout, allowed_failures)
            if scheduler == "local" and processes:
                spec["torch_threads"] = int(torch_threads or 1)
            elif cluster is None:  # a remote scheduler / given client: only when asked
                spec["torch_threads"] = torch_threads
        est = estimate_memory(plan, pred, np.dtype(info.array.dtype).itemsize)
        if memory_limit == "auto":
            if client is not None and cluster is None:
                lim, par, procs = _worker_memory_limit(client), threads_per_worker, 1
            else:
                import psutil

                lim = psutil.virtual_memory().available
                par = n_workers * threads_per_worker
                procs = n_workers if (scheduler == "local" and processes) else 0
            _check_memory(est, par, procs, lim)
        elif memory_limit is not None:
            _check_memory(est, n_workers * threads_per_worker, 0, float(memory_limit))

        marks = arr.map_overlap(
            _block_task, depth=depth, boundary="none", trim=False, dtype=np.uint8,
            chunks=tuple((1,) * len(c) for c in arr.chunks), spec=spec,
            name=f"leakseg-apply-{os.getpid()}-{id(spec):x}")
        parts = list(marks.to_delayed().ravel())
        total = len(parts)
        yield Progress(0, total, f"{total} blocks of {plan.y.chunks[0]}×{plan.x.chunks[0]} "
                                 f"(halo {max(plan.y.depth, plan.x.depth)}) on "
                                 f"{'this process' if scheduler is None else ('client' if _is_client(scheduler) else scheduler)}",
                       metrics={"est_task_mib": est["per_task_bytes"] / 2**20})
        done = 0
        if client is None:
            nthreads = max(1, n_workers)
            for i in range(0, total, nthreads):
                dask.compute(*parts[i:i + nthreads], scheduler="threads", num_workers=nthreads)
                done = min(total, i + nthreads)
                yield Progress(done, total, f"block {done}/{total}")
        else:
            from distributed import as_completed

            futures = client.compute(parts)
            ac = as_completed(futures, loop=client.loop)
            last = time.monotonic()
            try:
                while not ac.is_empty():  # every wait is bounded: a stuck cluster is reported
                    finished = ac.next_batch(block=False)
                    if not finished:
                        if time.monotonic() - last > block_timeout:
                            raise LeaksegError(
                                f"no block finished within {block_timeout:g} s ($LEAKSEG_BLOCK_TIMEOUT); the "
                                "dask cluster seems stuck (workers gone or overloaded); no output was written")
                        time.sleep(0.05)
                        continue
                    last = time.monotonic()
                    for fut in finished:
                        try:
                            fut.result(timeout=block_timeout)
                        except Exception as e:
                            raise _worker_error(e) from None
                        done += 1
                        yield Progress(done, total, f"block {done}/{total}")
            finally:
                client.cancel(futures)
        prov = {"capability": pred.capability, "operation": "leakseg apply",
                "model": model_path, "model_train": (pred.metadata or {}).get("train", {}),
                "source": info.path, "source_layer": info.name,
                "params": {"block": [plan.y.chunks[0], plan.x.chunks[0]],
                           "depth": [plan.y.depth, plan.x.depth], "tile": pred.tile,
                           "halo": pred.halo, "lohi": list(lohi) if lohi else None,
                           "scheduler": (str(getattr(scheduler, "scheduler", None) and scheduler.scheduler.address)
                                         if _is_client(scheduler) else scheduler) or "in-process",
                           "workers": n_workers,
                           "device": str(device)},
                "seconds": round(time.perf_counter() - t0, 2)}
        ax = [a for a in info.axes if a != "c"]
        sc = [s for a, s in zip(info.axes, info.scale) if a != "c"]
        if plan.out_channels:
            ax, sc = ax[:-2] + ["c"] + ax[-2:], sc[:-2] + [1.0] + sc[-2:]
        colors = None
        if pred.output == "labels":
            n = int(np.iinfo(plan.out_dtype).max) if plan.out_dtype.kind in "iu" else 0
            rng = np.random.default_rng(0)
            colors = [{"label-value": i, "rgba": [int(v) for v in rng.integers(40, 256, 3)] + [255]}
                      for i in range(1, min(n, max(pred.out_channels, 2) + 1) + 1)]
        finish_store(tmp, output_path, kind=pred.output if pred.output in ("labels", "image") else "image",
                     name=out_name, axes=ax, scale=sc, provenance=prov, colors=colors,
                     overwrite=overwrite)
        return output_path
    finally:
        discard_stage(tmp)
        if client is not None and not _is_client(scheduler):
            _bounded(lambda: client.close(timeout=max(2.0, connect_timeout)))
        if cluster is not None:
            _bounded(lambda: cluster.close(timeout=30))


def _bounded(close) -> None:
    """Closing a client/cluster is cleanup: bounded by its own timeout, and never the reason a
    run fails (the output is already committed or discarded)."""
    try:
        close()
    except Exception:  # noqa: BLE001 - a scheduler that vanished cannot be closed politely
        pass


def _worker_error(e: BaseException) -> LeaksegError:
    from distributed import KilledWorker

    if isinstance(e, KilledWorker):
        return LeaksegError(
            "a dask worker died while computing a block (it was retried and died again: "
            f"{str(e).splitlines()[0][:200]}); often out of memory - try a smaller --block or "
            "fewer --workers. No output was written")
    if isinstance(e, LeaksegError):
        return e
    return LeaksegError(f"a block failed on a dask worker: {type(e).__name__}: "
                        f"{str(e).splitlines()[0][:300] if str(e) else ''}; no output was written")


def apply_model(model_path, input_path, output_path, *, scheduler=None, n_workers: Optional[int] = None,
                overwrite: bool = False, device: str = "cpu", callback=None, **kw) -> Path:
    """Run a saved model over a (large, lazy) input and write an OME-Zarr store.

    ``scheduler``: None runs in this process with dask's thread pool; ``"local"``
    starts a ``LocalCluster`` of ``n_workers`` single-threaded worker processes;
    any other string is a scheduler address (``tcp://host:8786``) of an existing
    cluster (dask-jobqueue, Coiled, Kubernetes...) — the output path must be on
    storage the workers can write; a ``distributed.Client`` is used as is.
    Other keywords: ``block`` (pixels per task, default 2048), ``chunk`` (output
    zarr chunk, 512), ``processes`` (LocalCluster workers as processes, default
    True), ``connect_timeout`` (s, default 5 or $LEAKSEG_CONNECT_TIMEOUT),
    ``allowed_failures`` (retries of a block whose worker died, default 2),
    ``memory_limit`` ("auto": refuse runs the memory estimate says will not fit),
    ``torch_threads`` (torch threads per worker process; default 1 on a LocalCluster
    of processes, unchanged elsewhere), ``block_timeout`` (s without any finished block
    before a cluster run is abandoned; default 3600 or $LEAKSEG_BLOCK_TIMEOUT).
    ``connect_timeout`` is one deadline for the whole connection (TCP, dask handshake,
    client start).

    Bit-identity with :func:`predict_array` holds when both run with the same
    number of torch threads (oneDNN's convolution results can differ in the last
    float bit between thread counts, e.g. 1 vs 2); LocalCluster workers use 1. Output is bit-identical to :func:`predict_array`.
    """
    res = run_job(iter_apply(model_path, input_path, output_path, scheduler=scheduler,
                             n_workers=n_workers, overwrite=overwrite, device=device, **kw), callback)
    if res.cancelled:
        raise JobCancelled()
    return res.value
