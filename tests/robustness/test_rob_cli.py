"""Every ``leakseg`` command attacked with bad images, labels, files, outputs and model files.

Each case asserts:
* the command fails with a non-zero exit code and exactly ONE stderr line that
  names the problem (no traceback) -- or, for inputs that are odd but usable
  (1x1, bool, int64, RGBA...), succeeds and writes its output;
* the input files are unchanged (hashes before/after) and nothing is left
  under the output name after a failure;
* a following valid run of the same command succeeds.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import pytest
import torch

from conftest import FULL, assert_clean_failure, cli_commands, digest, record, run_cli, run_cli_subprocess, snapshot

RESULTS: dict = {}  # (command, case) -> "ok" | "refused: <line>"; summarised in docs/reliability.md


# --------------------------------------------------------------------------- workspace
class WS:
    """Input files and tiny trained models shared by every case of this module."""

    def __init__(self, root: Path):
        from napari_leakseg import samples
        from napari_leakseg.core import io

        self.root = root
        self.inp = root / "inputs"
        self.inp.mkdir()
        rng = np.random.default_rng(0)
        im = (rng.random((48, 64)) * 120).astype(np.uint8)
        im[:, 32:] += 100
        io.imwrite(self.inp / "img.png", im, kind="image")
        scr = np.zeros((48, 64), np.uint8)
        scr[10:14, 5:25] = 1
        scr[30:34, 40:60] = 2
        io.imwrite(self.inp / "scr.png", scr)
        mem, mlab = samples.membranes(shape=(64, 64), seed=0)
        io.imwrite(self.inp / "mem.png", mem, kind="image")
        io.imwrite(self.inp / "mem_lab.png", mlab)
        stack, tl = samples.timelapse(n_frames=3, shape=(48, 64), n_cells=3, seed=0)
        tlab = np.zeros_like(tl, np.uint8)
        tlab[0] = (tl[0] > 0).astype(np.uint8)  # frame 0 annotated: cell / background
        np.save(self.inp / "stack.npy", stack)
        np.save(self.inp / "stack_lab.npy", tlab)
        clean, low, _ = samples.sem_particles(shape=(64, 64), seed=0)
        io.imwrite(self.inp / "hi.tif", clean, kind="image")
        io.imwrite(self.inp / "lo.tif", low, kind="image")
        self.models: dict[str, Path] = {}
        self.cmds = cli_commands()
        self._train_models()

    def p(self, name) -> Path:
        return self.inp / name

    def _train_models(self):
        m = self.models
        if "segment" in self.cmds:
            m["scribble"] = self.p("m_scribble.pt")
            _ok(["segment", self.p("img.png"), "--scribbles", self.p("scr.png"), "--max-iter", "3",
                 "--out", self.root / "seg0.tif", "--save-model", m["scribble"], "-q"])
        if "membrane" in self.cmds:
            m["membrane"] = self.p("m_membrane.pt")
            _ok(["membrane", "train", "--images", self.p("mem.png"), "--labels", self.p("mem_lab.png"),
                 "--epochs", "1", "--steps-per-epoch", "1", "--crop", "32", "--batch-size", "1",
                 "--out", m["membrane"], "-q"])
        if "restore" in self.cmds:
            m["restore"] = self.p("m_restore.pt")
            _ok(["restore", "train", "--high", self.p("hi.tif"), "--degrade", "noise=0.1", "--steps", "2",
                 "--crop", "32", "--batch-size", "1", "--out", m["restore"], "-q"])
        if "propagate" in self.cmds:
            m["propagate"] = self.p("m_propagate.pt")
            _ok(_prop(self, self.root / "prop0.tif") + ["--save-model", m["propagate"]])


def _ok(argv):
    rc, out, err = run_cli(argv)
    assert rc == 0, f"setup command failed: {argv}\n{err}"


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    return WS(tmp_path_factory.mktemp("cli_ws"))


# --------------------------------------------------------------------------- command table
@dataclass
class Cmd:
    name: str
    top: str                                   # top-level subcommand that must exist
    out_ext: str
    valid: Callable                            # (ws, out) -> argv
    image: Optional[Callable] = None           # (ws, image_path, out) -> argv
    image_shape: tuple = (48, 64)
    labels: Optional[Callable] = None          # (ws, labels_path, out) -> argv
    model: Optional[Callable] = None           # (ws, model_path, out) -> argv
    capability: Optional[str] = None           # capability of the model it expects (None: any)
    #: cases this command legitimately accepts although most commands refuse them
    lenient: frozenset = frozenset()


Q = ["-q"]


def _seg_valid(ws, out):
    return ["segment", ws.p("img.png"), "--scribbles", ws.p("scr.png"), "--max-iter", "3", "--out", out] + Q


def _mem_train(ws, out, images=None, labels=None):
    return ["membrane", "train", "--images", images or ws.p("mem.png"), "--labels", labels or ws.p("mem_lab.png"),
            "--epochs", "1", "--steps-per-epoch", "1", "--crop", "32", "--batch-size", "1", "--out", out] + Q


def _res_train(ws, out, high=None):
    return ["restore", "train", "--high", high or ws.p("hi.tif"), "--degrade", "noise=0.1", "--steps", "2",
            "--crop", "32", "--batch-size", "1", "--out", out] + Q


def _prop(ws, out, stack=None, labels=None):
    return ["propagate", stack or ws.p("stack.npy"), "--labels", labels or ws.p("stack_lab.npy"),
            "--init-steps", "2", "--steps", "1", "--downsample", "1", "--out", out] + Q


def _as_time_lapse(ws, path, annotate: bool):
    """The 2-D attack array at ``path`` as a 3-frame stack (an image: the same frame 3 times;
    labels: frame 0 holds the attack labels, frames 1-2 are unlabelled). Files that are not a
    readable ``.npy`` (the bad-file cases) are passed on unchanged."""
    path = Path(path)
    if path.suffix != ".npy" or not path.is_file() or path.stat().st_size == 0:
        return path
    try:
        a = np.load(path, allow_pickle=False)
    except Exception:  # a corrupt file: the command itself must refuse it
        return path
    out = ws.p(f"tl_{'lab' if annotate else 'img'}_{path.stem}.npy")
    if not out.exists():
        if annotate:
            st = np.zeros((3,) + a.shape, a.dtype)
            st[0] = a
        else:
            st = np.stack([a] * 3)
        np.save(out, st)
    return out


def _prop_labels_for(ws, img_path):
    """A label stack matching an attack image's stack (frame 0: left half = 1), or the workspace's."""
    img_path = Path(img_path)
    if not img_path.name.startswith("tl_img_"):
        return ws.p("stack_lab.npy")
    st = np.load(img_path)
    out = ws.p(img_path.name.replace("tl_img_", "tl_lab_for_"))
    if not out.exists():
        lab = np.zeros(st.shape[:3], np.uint8) if st.ndim >= 3 else np.zeros(st.shape, np.uint8)
        if lab.ndim == 3 and lab.shape[2] > 0:
            lab[0, :, : max(1, lab.shape[2] // 2)] = 1
        np.save(out, lab)
    return out


def _prop_image(ws, im, out):
    st = _as_time_lapse(ws, im, annotate=False)
    return _prop(ws, out, stack=st, labels=_prop_labels_for(ws, st))


COMMANDS = [
    Cmd("segment", "segment", ".tif", _seg_valid,
        image=lambda ws, im, out: ["segment", im, "--max-iter", "3", "--out", out] + Q,
        labels=lambda ws, lab, out: ["segment", ws.p("img.png"), "--scribbles", lab, "--max-iter", "3",
                                     "--out", out] + Q,
        model=lambda ws, m, out: _seg_valid(ws, out) + ["--warm-start", m], capability="scribble"),
    Cmd("membrane train", "membrane", ".pt", _mem_train,
        labels=lambda ws, lab, out: _mem_train(ws, out, labels=lab), image_shape=(64, 64),
        model=lambda ws, m, out: _mem_train(ws, out) + ["--init", m], capability="membrane"),
    Cmd("membrane predict", "membrane", ".tif",
        lambda ws, out: ["membrane", "predict", ws.p("mem.png"), "--model", ws.models["membrane"],
                         "--out", out] + Q,
        image=lambda ws, im, out: ["membrane", "predict", im, "--model", ws.models["membrane"], "--out", out] + Q,
        labels=lambda ws, lab, out: ["membrane", "predict", ws.p("mem.png"), "--model", ws.models["membrane"],
                                     "--ref-images", ws.p("mem.png"), "--ref-labels", lab, "--out", out] + Q,
        image_shape=(64, 64),
        model=lambda ws, m, out: ["membrane", "predict", ws.p("mem.png"), "--model", m, "--out", out] + Q,
        capability="membrane"),
    Cmd("restore train", "restore", ".pt", _res_train,
        image=lambda ws, im, out: _res_train(ws, out, high=im)),
    Cmd("restore apply", "restore", ".tif",
        lambda ws, out: ["restore", "apply", ws.p("lo.tif"), "--model", ws.models["restore"], "--out", out] + Q,
        image=lambda ws, im, out: ["restore", "apply", im, "--model", ws.models["restore"], "--out", out] + Q,
        model=lambda ws, m, out: ["restore", "apply", ws.p("lo.tif"), "--model", m, "--out", out] + Q,
        capability="restore"),
    # time-lapse propagation: attack images/labels become 3-frame stacks (see _as_time_lapse);
    # it loads no model (--save-model only), so there are no model-file cases
    Cmd("propagate", "propagate", ".tif", _prop, image=_prop_image,
        labels=lambda ws, lab, out: _prop(ws, out, labels=_as_time_lapse(ws, lab, annotate=True))),
    Cmd("apply", "apply", ".zarr",
        lambda ws, out: ["apply", "--model", ws.models["restore"], "--input", ws.p("lo.tif"), "--out", out] + Q,
        image=lambda ws, im, out: ["apply", "--model", ws.models["restore"], "--input", im, "--out", out] + Q,
        model=lambda ws, m, out: ["apply", "--model", m, "--input", ws.p("lo.tif"), "--out", out] + Q),
    Cmd("export", "export", ".zarr",
        lambda ws, out: ["export", ws.p("mem_lab.png"), "--out", out] + Q,
        image=lambda ws, im, out: ["export", im, "--kind", "image", "--out", out] + Q,
        labels=lambda ws, lab, out: ["export", lab, "--out", out] + Q, image_shape=None,
        # a format converter: NaN/Inf/complex images and negative label ids are stored faithfully
        lenient=frozenset({"nan", "inf", "complex", "negative_ids"})),
]



def _cmd_params(attr=None):
    out = []
    for c in COMMANDS:
        if attr is None or getattr(c, attr) is not None:
            out.append(pytest.param(c, id=c.name.replace(" ", "-")))
    return out


def _need(ws, cmd: Cmd):
    if cmd.top not in ws.cmds:
        pytest.skip(f"`leakseg {cmd.top}` does not exist yet")
    if cmd.capability and cmd.capability not in ws.models:
        pytest.skip(f"no {cmd.capability} model could be trained")


# --------------------------------------------------------------------------- the check
def attack(ws, cmd: Cmd, argv, out: Path, case: str, must_fail: bool, needles=(), out_dir=None):
    """Run one attack and check the contract. Returns 'ok' or the error line."""
    out_dir = Path(out_dir or out.parent)
    watch = out_dir.exists() and out_dir.is_dir() and not str(out_dir).startswith("/sys")
    before_in = snapshot(ws.inp)
    before_out = snapshot(out_dir) if watch else {}
    rc, so, err = run_cli(argv)
    assert snapshot(ws.inp) == before_in, f"{cmd.name}/{case}: an input file changed"
    if must_fail or rc != 0:
        line = assert_clean_failure(rc, err, *needles)
        if watch:
            assert snapshot(out_dir) == before_out, f"{cmd.name}/{case}: output folder changed on failure"
        leftovers = [f.name for f in out_dir.iterdir() if ".tmp-" in f.name or ".partial-" in f.name] \
            if watch else []
        assert not leftovers, leftovers
        result = f"refused: {line}"
    else:
        assert out.exists(), f"{cmd.name}/{case}: exit 0 but no output {out}"
        result = "ok"
    RESULTS[(cmd.name, case)] = result
    record("cli", cmd.name, case, result)
    # the plugin still works afterwards
    good = out_dir / f"after_{case}{cmd.out_ext}"
    if not (watch and os.access(out_dir, os.W_OK)):
        good = ws.root / f"after_{cmd.name.replace(' ', '_')}_{case}{cmd.out_ext}"
    if good.exists():
        shutil.rmtree(good) if good.is_dir() else good.unlink()
    rc2, _, err2 = run_cli(cmd.valid(ws, good))
    assert rc2 == 0 and good.exists(), f"valid run after {cmd.name}/{case} failed: {err2}"
    return result


# --------------------------------------------------------------------------- images
def _image_cases():
    rng = np.random.default_rng(1)
    nan = rng.random((48, 64)).astype(np.float32)
    nan[5, 5] = np.nan
    inf = rng.random((48, 64)).astype(np.float32)
    inf[7, 9] = np.inf
    return {
        # name: (array, must_fail, words the error must contain)
        "zero_size": (np.zeros((0, 64), np.float32), True, ("empty",)),
        "one_by_one": (np.full((1, 1), 9, np.uint8), False, ()),
        "one_by_n": ((rng.random((1, 64)) * 255).astype(np.uint8), False, ()),
        "huge_aspect": ((rng.random((2, 6000)) * 255).astype(np.uint8), False, ()),
        "nan": (nan, True, ("nan",)),
        "inf": (inf, True, ("inf",)),
        "constant": (np.full((48, 64), 7.0, np.float32), False, ()),
        "bool": (rng.random((48, 64)) > 0.5, False, ()),
        "int64": (rng.integers(-2 ** 40, 2 ** 40, (48, 64)), False, ()),
        "float64": (rng.random((48, 64)) * 1e6, False, ()),
        "rgba": ((rng.random((48, 64, 4)) * 255).astype(np.uint8), False, ()),
        "five_d": (rng.random((2, 2, 2, 16, 16)).astype(np.float32), False, ()),
        "complex": (np.ones((48, 64), np.complex64), True, ("complex",)),
    }


IMAGE_CASES = list(_image_cases())


@pytest.mark.parametrize("case", IMAGE_CASES)
@pytest.mark.parametrize("cmd", _cmd_params("image"))
def test_bad_images(ws, cmd, case, tmp_path):
    _need(ws, cmd)
    arr, must_fail, needles = _image_cases()[case]
    must_fail = must_fail and case not in cmd.lenient
    src = ws.p(f"img_{case}.npy")
    if not src.exists():
        np.save(src, arr)
    out = tmp_path / f"out{cmd.out_ext}"
    attack(ws, cmd, cmd.image(ws, src, out), out, case, must_fail, needles)


# --------------------------------------------------------------------------- labels
def _label_cases(shape):
    base = np.zeros(shape, np.int64)
    base[2:6, 2:20] = 1
    base[-6:-2, -20:-2] = 2
    neg = base.astype(np.int16)
    neg[0, 0] = -1
    big = base.astype(np.uint32)
    big[-6:-2, -20:-2] = 70_000
    frac = base.astype(np.float32)
    frac[3, 3] = 0.5
    whole = base.astype(np.float32)
    return {
        "shape_mismatch": (base[:-5, :-3].astype(np.uint8), True, ("shape",)),
        "negative_ids": (neg, True, ("negative",)),
        "ids_above_65535": (big, False, ()),
        "float_fractional": (frac, True, ()),
        "float_whole": (whole, False, ()),
        "nan_labels": (np.where(base > 0, np.nan, 0).astype(np.float32), True, ()),
    }


LABEL_CASES = list(_label_cases((48, 64)))


@pytest.mark.parametrize("case", LABEL_CASES)
@pytest.mark.parametrize("cmd", _cmd_params("labels"))
def test_bad_labels(ws, cmd, case, tmp_path):
    _need(ws, cmd)
    shape = cmd.image_shape or (48, 64)
    arr, must_fail, needles = _label_cases(shape)[case]
    must_fail = must_fail and case not in cmd.lenient
    if cmd.image_shape is None and case == "shape_mismatch":
        pytest.skip("export has no image to mismatch")
    src = ws.p(f"lab_{shape[0]}x{shape[1]}_{case}.npy")
    if not src.exists():
        np.save(src, arr)
    out = tmp_path / f"out{cmd.out_ext}"
    attack(ws, cmd, cmd.labels(ws, src, out), out, case, must_fail, needles)


# --------------------------------------------------------------------------- input files
FILE_CASES = ["missing", "corrupt", "truncated", "directory", "empty_file", "unsupported_ext"]


def _bad_file(ws, case) -> Path:
    if case == "missing":
        return ws.p("does_not_exist.tif")
    if case == "corrupt":
        p = ws.p("corrupt.tif")
        p.write_bytes(b"II*\x00" + os.urandom(400))
    elif case == "truncated":
        p = ws.p("truncated.tif")
        data = ws.p("lo.tif").read_bytes()
        p.write_bytes(data[: len(data) // 2])
    elif case == "directory":
        p = ws.p("a_folder.tif")
        p.mkdir(exist_ok=True)
    elif case == "empty_file":
        p = ws.p("empty.npy")
        p.write_bytes(b"")
    else:
        p = ws.p("image.xyz")
        p.write_bytes(b"hello")
    return p


@pytest.mark.parametrize("case", FILE_CASES)
@pytest.mark.parametrize("cmd", _cmd_params("image"))
def test_bad_input_files(ws, cmd, case, tmp_path):
    _need(ws, cmd)
    src = _bad_file(ws, case)
    out = tmp_path / f"out{cmd.out_ext}"
    needles = () if case in ("unsupported_ext",) else ()
    line = attack(ws, cmd, cmd.image(ws, src, out), out, case, True, needles)
    assert src.name in line or str(src) in line or case == "directory", line


# --------------------------------------------------------------------------- outputs
OUTPUT_CASES = ["exists", "missing_folder", "folder_not_writable", "folder_is_a_file"]


def _unwritable_dir(tmp_path) -> Path:
    if os.geteuid() == 0:  # root ignores permission bits; /sys refuses new files even to root
        return Path("/sys")
    d = tmp_path / "ro"
    d.mkdir()
    d.chmod(0o500)
    return d


@pytest.mark.parametrize("case", OUTPUT_CASES)
@pytest.mark.parametrize("cmd", _cmd_params())
def test_bad_outputs(ws, cmd, case, tmp_path):
    _need(ws, cmd)
    out_dir = tmp_path
    if case == "exists":
        out = tmp_path / f"out{cmd.out_ext}"
        if cmd.out_ext == ".zarr":
            out.mkdir()
            (out / "precious.txt").write_text("keep me")
        else:
            out.write_bytes(b"precious")
        needles = ("exists",)
    elif case == "missing_folder":
        out = tmp_path / "no" / "such" / f"out{cmd.out_ext}"
        needles = ("does not exist",)
    elif case == "folder_not_writable":
        out_dir = _unwritable_dir(tmp_path)
        out = out_dir / f"leakseg_out{cmd.out_ext}"
        needles = ()
    else:
        f = tmp_path / "afile"
        f.write_text("x")
        out = f / f"out{cmd.out_ext}"
        needles = ()
    before = digest(out)
    attack(ws, cmd, cmd.valid(ws, out), out, case, True, needles, out_dir=out_dir)
    assert digest(out) == before
    if out_dir == tmp_path / "ro":
        out_dir.chmod(0o700)


def test_overwrite_replaces_atomically(ws, tmp_path):
    """--overwrite replaces an existing output; without it nothing changes."""
    cmd = COMMANDS[0]
    _need(ws, cmd)
    out = tmp_path / "o.tif"
    assert run_cli(cmd.valid(ws, out))[0] == 0
    h = digest(out)
    assert run_cli(cmd.valid(ws, out))[0] != 0 and digest(out) == h
    assert run_cli(cmd.valid(ws, out) + ["--overwrite"])[0] == 0
    assert [f.name for f in tmp_path.iterdir()] == ["o.tif"]


# --------------------------------------------------------------------------- model files
MODEL_CASES = ["missing", "corrupt", "truncated", "directory", "other_capability", "future_version",
               "malicious_pickle", "plain_state_dict", "weights_do_not_fit", "not_a_dict"]


class _Evil:
    marker = None

    def __reduce__(self):
        return (os.system, (f"touch {_Evil.marker}",))


def _bad_model(ws, cmd: Cmd, case: str, tmp: Path) -> Path:
    from napari_leakseg.core import store

    cap = cmd.capability or "restore"
    good = ws.models.get(cap) or next(iter(ws.models.values()))
    p = tmp / f"{case}.pt"
    if case == "missing":
        return tmp / "nope.pt"
    if case == "corrupt":
        p.write_bytes(os.urandom(2000))
    elif case == "truncated":
        d = good.read_bytes()
        p.write_bytes(d[: len(d) // 2])
    elif case == "directory":
        p.mkdir()
    elif case == "other_capability":
        others = [m for c, m in ws.models.items() if c != cap]
        if not others or cmd.capability is None:
            pytest.skip("needs a model of another capability (and a command bound to one)")
        shutil.copy(others[0], p)
    elif case == "future_version":
        sd, meta = store.load(good)
        torch.save({"format": store.FORMAT, "format_version": store.FORMAT_VERSION + 1,
                    "metadata": __import__("json").dumps(meta), "state_dict": sd}, p)
    elif case == "malicious_pickle":
        _Evil.marker = str(tmp / "PWNED")
        sd, meta = store.load(good)
        torch.save({"format": store.FORMAT, "format_version": 1, "metadata": __import__("json").dumps(meta),
                    "state_dict": sd, "payload": _Evil()}, p)
    elif case == "plain_state_dict":
        sd, _ = store.load(good)
        torch.save(sd, p)
    elif case == "weights_do_not_fit":
        sd, meta = store.load(good)
        sd = {k: (torch.zeros(tuple(s + 1 for s in v.shape)) if v.ndim else v) for k, v in sd.items()}
        store.save(sd, p, meta)
    elif case == "not_a_dict":
        torch.save([1, 2, 3], p)
    return p


@pytest.mark.parametrize("case", MODEL_CASES)
@pytest.mark.parametrize("cmd", _cmd_params("model"))
def test_bad_model_files(ws, cmd, case, tmp_path):
    _need(ws, cmd)
    if not ws.models:
        pytest.skip("no model could be trained")
    mdir = tmp_path / "models"
    mdir.mkdir()
    m = _bad_model(ws, cmd, case, mdir)
    before = digest(m)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    out = out_dir / f"out{cmd.out_ext}"
    needles = {"other_capability": ("model",), "future_version": ("newer",)}.get(case, ())
    attack(ws, cmd, cmd.model(ws, m, out), out, case, True, needles, out_dir=out_dir)
    assert digest(m) == before
    assert not (mdir / "PWNED").exists(), "the malicious pickle ran code!"


# --------------------------------------------------------------------------- memory
def test_input_far_beyond_memory_is_refused_up_front(ws, tmp_path):
    """A .npy whose header claims 2.2 TB: refused before reading, with advice to use zarr/tiles."""
    cmd = next(c for c in COMMANDS if c.name == "segment")
    _need(ws, cmd)
    src = tmp_path / "huge.npy"
    with open(src, "wb") as f:
        np.lib.format.write_array_header_1_0(
            f, {"descr": "<f4", "fortran_order": False, "shape": (800_000, 700_000)})
        f.write(b"\0" * 64)  # the data is not there: it must never be read
    out = tmp_path / "o.tif"
    rc, _, err = run_cli(cmd.image(ws, src, out))
    line = assert_clean_failure(rc, err, "memory", "zarr")
    assert "TiB" in line and not out.exists()


def test_memory_limit_env_refuses_a_real_read(ws, tmp_path, monkeypatch):
    cmd = next(c for c in COMMANDS if c.name == "segment")
    _need(ws, cmd)
    monkeypatch.setenv("LEAKSEG_MEMORY_LIMIT", "100K")
    src = tmp_path / "big.npy"
    np.save(src, np.random.default_rng(0).random((300, 400)).astype(np.float32))  # 480 KB > 80% of 100 KB
    rc, _, err = run_cli(cmd.image(ws, src, tmp_path / "o.tif"))
    assert_clean_failure(rc, err, "memory", "zarr")
    monkeypatch.delenv("LEAKSEG_MEMORY_LIMIT")
    assert run_cli(cmd.image(ws, src, tmp_path / "o.tif"))[0] == 0


# --------------------------------------------------------------------------- real processes
@pytest.mark.parametrize("cmd", [p for p in _cmd_params("image")
                                 if FULL or p.id in ("segment", "apply")])
def test_real_process_one_line_no_traceback(ws, cmd, tmp_path):
    """The installed ``leakseg`` script, in a fresh process: exit 2, one line, no traceback."""
    _need(ws, cmd)
    src = _bad_file(ws, "corrupt")
    rc, so, err = run_cli_subprocess(cmd.image(ws, src, tmp_path / f"o{cmd.out_ext}"))
    assert rc == 2, err
    assert_clean_failure(rc, err, "corrupt.tif")
