#!/usr/bin/env bash
# Set up napari-leakseg on a fresh Debian/Ubuntu machine: system libraries for
# napari's OpenGL/Qt (+ Xvfb for headless use) and a virtualenv in .venv with
# torch pinned to the CPU build (.ci/constraints.txt). Safe to run again.
set -euo pipefail
cd "$(dirname "$0")/.."

APT_PKGS="xvfb xauth libgl1-mesa-dri libglx-mesa0 libegl1 libxkbcommon-x11-0 libxcb-icccm4 libxcb-image0
libxcb-keysyms1 libxcb-randr0 libxcb-render-util0 libxcb-xinerama0 libxcb-xinput0 libxcb-xfixes0
libxcb-shape0 libxcb-cursor0 libdbus-1-3 libfontconfig1"

if command -v apt-get >/dev/null 2>&1; then
  missing=""
  for p in $APT_PKGS; do dpkg -s "$p" >/dev/null 2>&1 || missing="$missing $p"; done
  if [ -n "$missing" ]; then
    SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
    export DEBIAN_FRONTEND=noninteractive
    echo "installing system packages:$missing"
    $SUDO apt-get install -y --no-install-recommends $missing \
      || { $SUDO apt-get update && $SUDO apt-get install -y --no-install-recommends $missing; }
  fi
fi

PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null 2>&1 || PY=python3
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
# torch is pinned to the CPU wheel; an unpinned torch would pull a multi-GB CUDA build.
# Qt binding: PyQt6 only (napari deprecates PyQt5, and with both installed qtpy picks PyQt5);
# PyQt5 stays supported: pip install -e ".[pyqt5]" (CI tests it in a separate step).
.venv/bin/python -m pip install -q -c .ci/constraints.txt -e ".[test,pyqt6]"
.venv/bin/leakseg info --devices >/dev/null  # imports torch: a real check
echo "napari-leakseg is installed in .venv"
