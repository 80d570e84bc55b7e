"""Property-based tests (hypothesis) on the core functions.

For random shapes and dtypes: outputs have the documented shapes and dtypes,
inputs are never modified, and the only exceptions are our documented errors
(``LeaksegError`` subclasses).
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st
from hypothesis.extra import numpy as hnp

from napari_leakseg.core import labels as L
from napari_leakseg.core import normalize as N
from napari_leakseg.core import tiling as T
from napari_leakseg.core.errors import InputError, LeaksegError

FAST = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
SLOW = settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])

INT_DTYPES = [np.uint8, np.uint16, np.uint32, np.uint64, np.int8, np.int16, np.int32, np.int64]
IMG_DTYPES = INT_DTYPES + [np.bool_, np.float16, np.float32, np.float64]


# --------------------------------------------------------------------------- tiling
@FAST
@given(n=st.integers(1, 3000), tile=st.integers(1, 600), ov=st.integers(0, 200))
def test_tile_starts_cover_everything(n, tile, ov):
    starts = T.tile_starts(n, tile, ov)
    t = min(tile, n)
    assert starts[0] == 0 and starts == sorted(set(starts))
    assert all(0 <= s <= n - t for s in starts)
    covered = np.zeros(n, bool)
    for s in starts:
        covered[s:s + t] = True
    assert covered.all()
    if ov < t:  # consecutive tiles overlap by at least `ov`
        assert all(b - a <= t - ov for a, b in zip(starts, starts[1:]))


@FAST
@given(c=st.integers(1, 3), h=st.integers(1, 70), w=st.integers(1, 70), tile=st.integers(1, 48),
       ov=st.integers(0, 16), cout=st.integers(1, 3), two_d=st.booleans(),
       out_dtype=st.sampled_from([np.float32, np.float64, np.float16]))
def test_tiling_shapes_dtypes_and_exactness(c, h, w, tile, ov, cout, two_d, out_dtype):
    rng = np.random.default_rng(h * 131 + w)
    img = rng.random((c, h, w)).astype(np.float32)
    keep = img.copy()
    if two_d:
        fn = lambda t: t.sum(0) * 0.5  # noqa: E731 - returns (h, w): promoted to one channel
        expect = img.sum(0, keepdims=True) * 0.5
    else:
        fn = lambda t: np.repeat(t[:1] * 2 - 1, cout, 0)  # noqa: E731
        expect = np.repeat(img[:1] * 2 - 1, cout, 0)
    out = T.predict_tiled(fn, img, tile=tile, overlap=ov, out_dtype=out_dtype)
    assert out.shape == expect.shape and out.dtype == np.dtype(out_dtype)
    tol = 2e-3 if out_dtype == np.float16 else 1e-5
    np.testing.assert_allclose(out.astype(np.float32), expect, rtol=tol, atol=tol)
    np.testing.assert_array_equal(img, keep)  # input untouched


@SLOW
@given(h=st.integers(1, 80), w=st.integers(1, 80), tile=st.integers(4, 40), ov=st.integers(0, 12),
       kind=st.sampled_from(["dask", "zarr"]))
def test_tiling_lazy_inputs_match_numpy(tmp_path_factory, h, w, tile, ov, kind):
    import dask.array as da
    import zarr

    img = np.random.default_rng(h + 7 * w).random((1, h, w)).astype(np.float32)
    if kind == "dask":
        lazy = da.from_array(img, chunks=(1, 17, 23))
    else:
        lazy = zarr.create_array(store=zarr.storage.MemoryStore(), shape=img.shape, chunks=(1, 16, 16),
                                 dtype="f4")
        lazy[:] = img
    got = T.predict_tiled(lambda t: t + 1, lazy, tile=tile, overlap=ov)
    # a lazy input gives exactly what the same array in memory gives ...
    np.testing.assert_array_equal(got, T.predict_tiled(lambda t: t + 1, img, tile=tile, overlap=ov))
    # ... and blending an identity-like model reproduces it up to float32 round-off
    np.testing.assert_allclose(got, img + 1, rtol=1e-6, atol=1e-5)


@FAST
@given(lead=st.integers(0, 2), h=st.integers(1, 40), w=st.integers(1, 40), m=st.sampled_from([1, 2, 4, 8, 16]),
       mode=st.sampled_from(["reflect", "edge", "constant"]))
def test_pad_to_multiple(lead, h, w, m, mode):
    x = np.random.default_rng(h * w).random((2,) * lead + (h, w)).astype(np.float32)
    p, (Y, X) = T.pad_to_multiple(x, m, mode=mode)
    assert (Y, X) == (h, w)
    assert p.shape[-2] % m == 0 and p.shape[-1] % m == 0 and p.shape[:-2] == x.shape[:-2]
    assert p.shape[-2] - h < m and p.shape[-1] - w < m
    np.testing.assert_array_equal(p[..., :h, :w], x)


def test_tiling_rejects_wrong_ndim_with_value_error():
    with pytest.raises(ValueError, match="expects \\(C, Y, X\\)"):
        T.predict_tiled(lambda t: t, np.zeros((4, 4), np.float32))


# --------------------------------------------------------------------------- normalisation
def _images(dtypes=IMG_DTYPES, min_side=1, max_side=12, max_dims=4):
    return st.sampled_from(dtypes).flatmap(
        lambda dt: hnp.arrays(dt, hnp.array_shapes(min_dims=1, max_dims=max_dims, min_side=min_side,
                                                   max_side=max_side),
                              elements=(hnp.from_dtype(np.dtype(dt), allow_nan=True, allow_infinity=True)
                                        if np.dtype(dt).kind == "f" else None)))


@FAST
@given(a=_images(), clip=st.booleans())
def test_normalize_any_dtype(a, clip):
    keep = a.copy()
    try:
        N.check_image(a)
    except InputError as e:
        finite = np.isfinite(a).all() if a.dtype.kind == "f" else True
        assert not finite or a.size == 0, f"valid image rejected: {e}"
        return
    out = N.normalize(a, clip=clip)
    assert out.shape == a.shape and out.dtype == np.float32
    assert np.isfinite(out).all(), (a, out)
    if clip:
        assert out.min() >= 0 and out.max() <= 1
    np.testing.assert_array_equal(a, keep)  # never in place
    # order-preserving (ties and float32 rounding aside)
    flat_a = a.astype(np.float64).ravel()
    flat_o = out.astype(np.float64).ravel()
    order = np.argsort(flat_a, kind="stable")
    assert np.all(np.diff(flat_o[order]) >= -1e-6)


@FAST
@given(shape=hnp.array_shapes(min_dims=2, max_dims=4, max_side=10), dt=st.sampled_from(IMG_DTYPES),
       v=st.integers(0, 1))
def test_constant_image_normalises_to_zeros(shape, dt, v):
    a = np.full(shape, v, dtype=dt)
    out = N.normalize(a)
    assert out.dtype == np.float32 and out.shape == a.shape and not out.any()


@FAST
@given(a=hnp.arrays(np.float64, hnp.array_shapes(min_dims=2, max_dims=3, max_side=10),
                    elements=st.floats(-1e308, 1e308, allow_nan=False)))
def test_normalize_float64_beyond_float32_range(a):
    """float64 data beyond float32's range (1e308) still gives finite output, not inf/NaN."""
    out = N.normalize(a)
    assert np.isfinite(out).all()


@FAST
@given(a=hnp.arrays(np.int64, hnp.array_shapes(min_dims=2, max_dims=2, max_side=10),
                    elements=st.integers(-2 ** 62, 2 ** 62)))
def test_normalize_int64_extremes(a):
    out = N.normalize(a, clip=True)
    assert np.isfinite(out).all() and out.min() >= 0 and out.max() <= 1


@FAST
@given(shape=st.tuples(st.integers(0, 5), st.integers(0, 5)))
def test_check_image_empty_is_input_error(shape):
    a = np.zeros(shape, np.float32)
    if a.size == 0:
        with pytest.raises(InputError, match="empty"):
            N.check_image(a)
    else:
        N.check_image(a)


@pytest.mark.parametrize("a", [np.zeros((3, 3), np.complex64), np.array([["a"]]), np.zeros(()),
                               np.zeros((2, 2), object)])
def test_check_image_unusable_dtypes(a):
    with pytest.raises(InputError):
        N.check_image(a)


@FAST
@given(shape=st.sampled_from([(5, 6), (5, 6, 3), (5, 6, 4), (1, 1), (1, 9)]), dt=st.sampled_from(IMG_DTYPES))
def test_to_channels_first(shape, dt):
    a = np.zeros(shape, dt)
    x = N.to_channels_first(a)
    assert x.ndim == 3 and x.shape[1:] == shape[:2]
    assert N.drop_alpha(x).shape[0] in (1, 3)


@pytest.mark.parametrize("shape", [(2, 3, 5), (2, 3, 4, 5), (1, 2, 3, 4, 5), (7,)])
def test_to_channels_first_rejects_non_2d(shape):
    with pytest.raises(InputError):
        N.to_channels_first(np.zeros(shape))


# --------------------------------------------------------------------------- labels
def _labels():
    return st.sampled_from(INT_DTYPES + [np.bool_, np.float32, np.float64]).flatmap(
        lambda dt: hnp.arrays(dt, hnp.array_shapes(min_dims=1, max_dims=4, max_side=9),
                              elements=(st.one_of(st.floats(-3, 70000, width=32), st.sampled_from([np.nan, np.inf, 0.5]),
                                                   st.integers(-3, 70000).map(float))
                                        if np.dtype(dt).kind == "f" else None)))


@FAST
@given(a=_labels(), max_id=st.one_of(st.none(), st.integers(0, 70000)))
def test_check_labels_only_documented_errors(a, max_id):
    keep = a.copy()
    try:
        out = L.check_labels(a, max_id=max_id)
    except InputError as e:
        msg = str(e)
        assert any(k in msg for k in ("negative", "non-integer", "NaN", "at most", "empty")), msg
        return
    finally:
        np.testing.assert_array_equal(a, keep)
    assert out.dtype.kind in "iu" and out.shape == a.shape
    assert out.min(initial=0) >= 0
    if max_id is not None:
        assert out.max(initial=0) <= max_id
    np.testing.assert_array_equal(out, a.astype(np.float64).astype(out.dtype) if a.dtype.kind == "f" else a)


@FAST
@given(shape=st.tuples(st.integers(1, 6), st.integers(1, 6)), other=st.tuples(st.integers(1, 6), st.integers(1, 6)))
def test_check_labels_shape_mismatch(shape, other):
    a = np.zeros(shape, np.uint8)
    if shape == other:
        L.check_labels(a, other)
    else:
        with pytest.raises(InputError, match="does not match"):
            L.check_labels(a, other)


@FAST
@given(a=st.sampled_from([np.uint8, np.uint16, np.uint32, np.int32, np.int64, np.uint64]).flatmap(
           lambda dt: hnp.arrays(dt, hnp.array_shapes(min_dims=1, max_dims=4, max_side=9),
                                 elements=st.integers(0, min(2 ** 31 - 1, int(np.iinfo(dt).max))))),
       keep=st.integers(0, 5))
def test_compact_relabel(a, keep):
    orig = a.copy()
    out = L.compact(a, keep=keep)
    np.testing.assert_array_equal(a, orig)
    assert out.shape == a.shape and out.dtype.kind == "u"
    # smallest unsigned dtype that holds the max id
    m = int(out.max(initial=0))
    assert out.dtype == L.smallest_uint(np.array([m])).dtype
    # ids 0..keep preserved exactly
    low = a <= keep
    np.testing.assert_array_equal(out[low], a[low])
    # others are consecutive keep+1.. in increasing order of the old id
    hi_old = np.unique(a[a > keep])
    hi_new = np.unique(out[a > keep])
    np.testing.assert_array_equal(hi_new, np.arange(keep + 1, keep + 1 + hi_old.size))
    # same partition: a bijection between old and new ids
    pairs = np.unique(np.stack([a.ravel().astype(np.uint64), out.ravel().astype(np.uint64)]), axis=1)
    assert len(np.unique(pairs[0])) == pairs.shape[1] == len(np.unique(pairs[1]))


@FAST
@given(m=st.integers(0, 2 ** 64 - 1))
def test_smallest_uint(m):
    out = L.smallest_uint(np.array([m], dtype=np.uint64))
    assert int(out[0]) == m and out.dtype.kind == "u"
    if out.dtype != np.uint64:
        assert m <= np.iinfo(out.dtype).max


# --------------------------------------------------------------------------- zarr round trip
@SLOW
@given(shape=hnp.array_shapes(min_dims=2, max_dims=5, min_side=1, max_side=7),
       dt=st.sampled_from(INT_DTYPES), kind=st.sampled_from(["labels", "image"]), seed=st.integers(0, 99))
def test_zarr_round_trip_bit_identical(tmp_path_factory, shape, dt, kind, seed):
    from napari_leakseg.zarr_io import open_ome_zarr, write_ome_zarr

    info = np.iinfo(dt)
    rng = np.random.default_rng(seed)
    a = rng.integers(info.min, info.max, size=shape, dtype=dt, endpoint=True)
    keep = a.copy()
    d = tmp_path_factory.mktemp("z")
    p = write_ome_zarr(d / "x.zarr", a, kind=kind)
    items = open_ome_zarr(p)
    got = [arr for arr, _, k in items if k == kind]
    assert len(got) == 1
    back = np.asarray(got[0])
    assert back.dtype == a.dtype and back.shape == a.shape
    np.testing.assert_array_equal(back, a)
    np.testing.assert_array_equal(a, keep)
    assert not [f for f in d.iterdir() if f.name.startswith(".")]  # no staging leftovers


@SLOW
@given(shape=hnp.array_shapes(min_dims=2, max_dims=3, max_side=6), dt=st.sampled_from([np.float32, np.float64]),
       frac=st.booleans())
def test_zarr_float_labels(tmp_path_factory, shape, dt, frac):
    """Whole-number float labels are written as integers; fractional ones are refused cleanly."""
    from napari_leakseg.zarr_io import read_zarr, write_ome_zarr

    a = np.random.default_rng(0).integers(0, 9, shape).astype(dt)
    if frac:
        a.flat[0] = 0.5
    d = tmp_path_factory.mktemp("zf")
    if frac:
        with pytest.raises(InputError, match="fractional"):
            write_ome_zarr(d / "f.zarr", a, kind="labels")
        assert list(d.iterdir()) == []  # nothing left behind
    else:
        p = write_ome_zarr(d / "f.zarr", a, kind="labels")
        np.testing.assert_array_equal(np.asarray(read_zarr(p)), a.astype(np.uint32))


@pytest.mark.parametrize("ndim", [1, 6])
def test_zarr_unsupported_ndim_fails_cleanly(tmp_path, ndim):
    from napari_leakseg.zarr_io import write_ome_zarr

    with pytest.raises(LeaksegError):
        write_ome_zarr(tmp_path / "x.zarr", np.zeros((2,) * ndim, np.uint8))
    assert not list(tmp_path.iterdir())


# --------------------------------------------------------------------------- registration
def _texture(shape, seed):
    from scipy import ndimage as ndi

    r = np.random.default_rng(seed).random(shape)
    return ndi.gaussian_filter(r, 2.0).astype(np.float32)


@SLOW
@given(dy=st.integers(-6, 6), dx=st.integers(-6, 6), h=st.integers(48, 96), w=st.integers(48, 96),
       seed=st.integers(0, 50))
def test_register_pair_recovers_shift(dy, dx, h, w, seed):
    restore = pytest.importorskip("napari_leakseg.restore")
    big = _texture((h + 20, w + 20), seed)
    high = big[10:10 + h, 10:10 + w]
    low = big[10 + dy:10 + dy + h, 10 + dx:10 + dx + w]  # low[y, x] = high[y + dy, x + dx]
    low_n = low + np.random.default_rng(seed).normal(0, 0.002, low.shape).astype(np.float32)
    lk, hk = low_n.copy(), high.copy()
    lc, hc, shift, corr = restore.register_pair(low_n, high)
    np.testing.assert_array_equal(low_n, lk)
    np.testing.assert_array_equal(high, hk)
    assert lc.shape == hc.shape and lc.ndim == 2 and lc.size > 0
    assert lc.shape[0] >= h - abs(dy) - 1 and lc.shape[1] >= w - abs(dx) - 1
    assert abs(abs(shift[0]) - abs(dy)) < 0.6 and abs(abs(shift[1]) - abs(dx)) < 0.6, (shift, dy, dx)
    assert corr > 0.8


@SLOW
@given(h=st.integers(1, 40), w=st.integers(1, 40), seed=st.integers(0, 20),
       kind=st.sampled_from(["noise", "constant", "mismatch", "nan"]))
def test_register_pair_only_documented_errors(h, w, seed, kind):
    restore = pytest.importorskip("napari_leakseg.restore")
    rng = np.random.default_rng(seed)
    a = rng.random((h, w)).astype(np.float32)
    b = rng.random((h, w)).astype(np.float32)
    if kind == "constant":
        b = np.full((h, w), 3.0, np.float32)
    elif kind == "mismatch":
        b = rng.random((h + 1, w)).astype(np.float32)
    elif kind == "nan":
        b[0, 0] = np.nan
    try:
        lc, hc, shift, corr = restore.register_pair(a, b)
    except LeaksegError:
        return
    assert lc.shape == hc.shape and np.isfinite(corr)
    assert kind not in ("mismatch", "constant", "nan")
