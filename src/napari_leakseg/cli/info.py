"""``leakseg info``: versions, the torch build, and (with ``--devices``) devices and threads.

Plain ``leakseg info`` answers in well under a second: versions come from the
installed packages' metadata and the torch build from its files, without
importing torch (importing torch alone takes 1-2 s, much more on a busy machine).
``--devices`` imports torch and asks it which devices it can use and how many
threads it runs.
"""

from __future__ import annotations

import os
import platform

PACKAGES = ("numpy", "torch", "napari", "magicgui", "qtpy", "PyQt6", "PyQt5", "zarr", "ome-zarr", "dask",
            "scikit-image")


def register(sub) -> None:
    p = sub.add_parser("info", help="print versions and the torch build (--devices: devices, threads)",
                       description="Versions of napari-leakseg and its main dependencies and the torch build, "
                                   "without importing torch. --devices also imports torch and lists the devices "
                                   "it can use (what 'auto' picks) and its thread count.")
    p.add_argument("--devices", action="store_true",
                   help="also import torch and list usable devices, what 'auto' picks and torch threads (slower)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=run)


def torch_build() -> str:
    """'cuda', 'rocm' or 'cpu': which torch build is installed (from its files; torch is not imported)."""
    import importlib.util
    from pathlib import Path

    spec = importlib.util.find_spec("torch")
    if spec is None or not spec.submodule_search_locations:
        return "not installed"
    lib = Path(list(spec.submodule_search_locations)[0]) / "lib"
    names = {p.name.lower() for p in lib.iterdir()} if lib.is_dir() else set()
    if any(n.startswith(("libtorch_hip", "torch_hip")) for n in names):
        return "rocm"
    if any(n.startswith(("libtorch_cuda", "torch_cuda")) for n in names):
        return "cuda"
    return "cpu"


def driver_gpus() -> list[str]:
    """NVIDIA GPUs the Linux driver reports (``/proc/driver/nvidia/gpus``); [] elsewhere."""
    from pathlib import Path

    root = Path("/proc/driver/nvidia/gpus")
    out = []
    try:
        for d in sorted(root.iterdir()):
            model = "NVIDIA GPU"
            for line in (d / "information").read_text(errors="replace").splitlines():
                if line.startswith("Model:"):
                    model = line.split(":", 1)[1].strip()
            out.append(model)
    except OSError:
        pass
    return out


def collect(devices: bool = False) -> dict:
    from importlib.metadata import PackageNotFoundError, version

    from .. import __version__

    info = {"napari-leakseg": __version__, "python": platform.python_version(),
            "platform": platform.platform()}
    for pkg in PACKAGES:
        try:
            info[pkg] = version(pkg)
        except PackageNotFoundError:
            info[pkg] = "not installed"
    from .demo import qt_api_for_demo

    info["demo_qt_api"] = qt_api_for_demo() or "none installed"
    info["torch_build"] = torch_build()
    gpus = driver_gpus()
    if gpus:
        info["driver_gpus"] = gpus
    info["cpu_count"] = os.cpu_count()
    if devices:
        from ..core.device import device_info

        info.update(device_info())
    else:
        info["devices"] = "not probed: `leakseg info --devices` imports torch and lists them"
    return info


def run(args) -> int:
    import json

    info = collect(args.devices)
    if args.json:
        print(json.dumps(info, indent=1))
    else:
        for k, v in info.items():
            print(f"{k:>16}: {', '.join(v) if isinstance(v, list) else v}")
    return 0
