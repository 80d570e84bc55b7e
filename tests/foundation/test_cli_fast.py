"""The command line starts fast: torch, napari and dask are imported only by the subcommands that use them.

``leakseg --help``, ``--version``, ``leakseg info`` and argument errors must come back in
well under a second (``benchmarks/bench_cli.py`` measures it); importing torch alone takes
1-2 s. These tests check the cause directly, in fresh processes: which modules got imported.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

PY = sys.executable
HEAVY = ("torch", "napari", "dask", "qtpy", "zarr", "numpy", "scipy", "skimage", "distributed")


def _modules_after(code: str) -> tuple[int, list[str], str]:
    """Run ``code`` in a fresh interpreter; return (rc, heavy modules imported, stdout)."""
    probe = (
        "import sys, json\n"
        "try:\n"
        + "".join(f"    {line}\n" for line in code.splitlines())
        + "except SystemExit as e:\n"
        "    rc = e.code\n"
        "else:\n"
        "    rc = 0\n"
        f"heavy = sorted({{k.split('.')[0] for k in sys.modules}} & set({HEAVY!r}))\n"
        "print('\\nPROBE ' + json.dumps([rc, heavy]))\n"
    )
    r = subprocess.run([PY, "-c", probe], capture_output=True, text=True, timeout=120)
    assert "PROBE " in r.stdout, r.stderr[-2000:]
    out, _, tail = r.stdout.rpartition("\nPROBE ")
    rc, heavy = json.loads(tail)
    return rc, heavy, out


def test_importing_the_cli_imports_no_heavy_package():
    rc, heavy, _ = _modules_after("import napari_leakseg.cli.main as m\nm.build_parser()")
    assert rc == 0
    assert heavy == [], f"building the leakseg parser imported {heavy}"


@pytest.mark.parametrize("argv", [["--help"], ["--version"], ["info"], ["info", "--json"],
                                  ["segment"], ["info", "--bogus"], ["membrane", "train", "--help"],
                                  ["demo", "--help"], ["apply", "--model"]])
def test_fast_paths_import_no_heavy_package(argv):
    """--help, --version, info and argument errors never import torch, napari or dask."""
    rc, heavy, out = _modules_after(f"from napari_leakseg.cli.main import main\nsys.exit(main({argv!r}))")
    assert heavy == [], f"leakseg {' '.join(argv)} imported {heavy}"
    if argv[0] in ("segment", "apply") or "--bogus" in argv:
        assert rc == 2  # argparse's usage error
    else:
        assert rc in (0, None)


def test_info_reports_versions_without_torch_and_devices_with_it():
    rc, heavy, out = _modules_after("from napari_leakseg.cli.main import main\nsys.exit(main(['info', '--json']))")
    info = json.loads(out)
    assert rc in (0, None) and "torch" not in heavy
    from importlib.metadata import version

    assert info["torch"] == version("torch")          # from the package metadata
    assert info["torch_build"] in ("cpu", "cuda", "rocm")
    assert "--devices" in info["devices"]             # says how to probe, does not pretend
    rc, heavy, out = _modules_after(
        "from napari_leakseg.cli.main import main\nsys.exit(main(['info', '--devices', '--json']))")
    info = json.loads(out)
    assert rc in (0, None) and "torch" in heavy
    import torch

    assert info["devices"][0] == "auto" and info["devices"][-1] == "cpu"
    assert ("cuda" in info["devices"]) == torch.cuda.is_available()
    assert info["torch_threads"] >= 1


def test_torch_build_matches_torch():
    """The build is read from torch's files without importing it; it must agree with torch itself."""
    import torch

    from napari_leakseg.cli.info import torch_build

    want = "rocm" if getattr(torch.version, "hip", None) else ("cuda" if torch.version.cuda else "cpu")
    assert torch_build() == want


def test_demo_qt_api_prefers_pyqt6_but_respects_qt_api():
    import importlib.util

    from napari_leakseg.cli.demo import qt_api_for_demo

    assert qt_api_for_demo({"QT_API": "PyQt5"}) == "pyqt5"
    have6 = importlib.util.find_spec("PyQt6") is not None
    assert qt_api_for_demo({}) == ("pyqt6" if have6 else None)
