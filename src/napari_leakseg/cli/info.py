"""``leakseg info``: versions, devices and threads."""

from __future__ import annotations

import json
import platform


def register(sub) -> None:
    p = sub.add_parser("info", help="print versions, devices and threads")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=run)


def run(args) -> int:
    from importlib.metadata import PackageNotFoundError, version

    from .. import __version__
    from ..core.device import device_info

    info = {"napari-leakseg": __version__, "python": platform.python_version(),
            "platform": platform.platform()}
    for pkg in ("numpy", "napari", "magicgui", "qtpy", "zarr", "ome-zarr", "dask", "scikit-image"):
        try:
            info[pkg] = version(pkg)
        except PackageNotFoundError:
            info[pkg] = "not installed"
    info.update(device_info())
    if args.json:
        print(json.dumps(info, indent=1))
    else:
        for k, v in info.items():
            print(f"{k:>16}: {v}")
    return 0
