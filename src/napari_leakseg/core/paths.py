"""The rules for paths the plugin reads and writes (plain Python: no numpy, torch or zarr).

* :func:`check_input_file` — an input must not be a special file (named pipe,
  device, socket): opening one can block forever, so it is refused before it is
  opened. Every reader (``core.io.imread``, ``core.store.load``, the zarr reader)
  calls it.
* :func:`check_target` — the one rule for outputs, used by every writer:

  - an output that **is**, **contains** or **lies inside** any input (after
    resolving symlinks; hard links count as the same file) is refused;
  - an existing output is refused unless ``overwrite``; with ``overwrite`` only a
    plain file (or a symlink, which is replaced, never its target) or a store that
    napari-leakseg wrote (:func:`is_our_store`) may be replaced — never a folder of
    other files, never a special file;
  - the parent folder must exist, be a folder and accept new files.

``core`` never imports a capability module; this module imports nothing from the
package except the error classes.
"""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path
from typing import Iterable, Optional

from .errors import InputError, OutputExistsError

#: our provenance key in a zarr store's root attributes (how we recognise our own stores)
PROVENANCE_KEY = "napari_leakseg"
#: files that may sit at the top of a store we wrote (anything else is the user's)
_STORE_FILES = {".zgroup", ".zattrs", ".zarray", ".zmetadata", "zarr.json"}
_SPECIAL = ((stat.S_ISFIFO, "a named pipe (FIFO)"), (stat.S_ISCHR, "a character device"),
            (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"))


# --------------------------------------------------------------------------- special files
def special_kind(path) -> Optional[str]:
    """"a named pipe (FIFO)", "a character device", ... for a special file; None otherwise
    (also for a missing path). ``stat`` never opens the file, so it cannot block."""
    try:
        mode = os.stat(path).st_mode  # follows symlinks: a link to a FIFO is a FIFO
    except (OSError, ValueError):
        return None
    for test, name in _SPECIAL:
        if test(mode):
            return name
    return None


def check_input_file(path, what: str = "input", error=InputError) -> Path:
    """Refuse a special file before anything opens it (reading a FIFO blocks until a writer
    comes, a device may never end). Raises ``error`` (``InputError`` by default)."""
    kind = special_kind(path)
    if kind is not None:
        raise error(f"{what} {path} is {kind}, not a regular file; refused before opening it")
    return Path(path)


def check_store_files(path, what: str = "input") -> None:
    """A zarr store's metadata files must be regular files (a FIFO named ``.zattrs`` would block
    the zarr reader). Walks groups and arrays, not chunk folders (bounded by the node count)."""
    root = Path(path)
    if not root.is_dir():
        check_input_file(root, what)
        return
    todo, seen = [root], 0
    while todo and seen < 10_000:
        d = todo.pop()
        seen += 1
        try:
            entries = list(os.scandir(d))
        except OSError:
            continue
        for e in entries:
            if e.name in _STORE_FILES:
                check_input_file(e.path, f"{what} store file")
            elif e.is_dir(follow_symlinks=False) and not e.name.isdigit() and not e.name.startswith(".partial"):
                # chunk folders have numeric names: not walked
                todo.append(Path(e.path))


# --------------------------------------------------------------------------- our stores
def _read_json(p: Path) -> Optional[dict]:
    try:
        if special_kind(p) is not None or p.stat().st_size > 2 ** 22:
            return None
        data = json.loads(p.read_text())
    except (OSError, ValueError, UnicodeDecodeError):
        return None
    return data if isinstance(data, dict) else None


def is_our_store(path) -> bool:
    """True for a zarr store written by napari-leakseg: its root attributes carry our
    provenance (zarr v2 ``.zattrs`` or v3 ``zarr.json``) and its top level holds only
    zarr metadata files and folders (no other files of the user's)."""
    p = Path(path)
    if p.is_symlink() or not p.is_dir():
        return False
    attrs = _read_json(p / ".zattrs")
    if attrs is None:
        z3 = _read_json(p / "zarr.json") or {}
        attrs = z3.get("attributes") if isinstance(z3.get("attributes"), dict) else None
    if not attrs or not isinstance(attrs.get(PROVENANCE_KEY), dict):
        return False
    if attrs[PROVENANCE_KEY].get("package") != "napari-leakseg":
        return False
    try:
        for e in os.scandir(p):
            if not e.is_dir(follow_symlinks=False) and e.name not in _STORE_FILES:
                return False
    except OSError:
        return False
    return True


# --------------------------------------------------------------------------- inputs vs outputs
def _real(p) -> Path:
    return Path(os.path.realpath(os.path.abspath(os.fspath(p))))


def check_not_input(path, inputs: Iterable = ()) -> None:
    """Refuse an output that is, contains or lies inside one of ``inputs`` (symlinks resolved,
    hard links compared by inode)."""
    out = _real(path)
    for i in inputs or ():
        if i is None:
            continue
        src = _real(i)
        same = out == src
        if not same:
            try:
                same = os.path.exists(path) and os.path.exists(i) and os.path.samefile(path, i)
            except OSError:
                same = False
        if same:
            raise OutputExistsError(f"output {path} is the input {i}; inputs are never overwritten: "
                                    "choose another output name")
        if src in out.parents:
            raise OutputExistsError(f"output {path} lies inside the input {i}; inputs are never "
                                    "modified: write the output elsewhere")
        if out in src.parents:
            raise OutputExistsError(f"output {path} contains the input {i}; replacing it would "
                                    "delete the input: choose another output name")


def _check_replaceable(path: Path) -> None:
    """With ``overwrite``: only a plain file, a symlink or a store we wrote may be replaced."""
    if path.is_symlink():
        return  # os.replace swaps the link itself; its target is never touched
    kind = special_kind(path)
    if kind is not None:
        raise OutputExistsError(f"output {path} is {kind}; it is never replaced")
    if path.is_dir():
        if not is_our_store(path):
            raise OutputExistsError(
                f"output {path} is a folder with files napari-leakseg did not write; --overwrite replaces "
                "only files and stores it wrote, never a folder of other files: choose another name")
    elif not path.is_file():  # pragma: no cover - unknown file type
        raise OutputExistsError(f"output {path} is not a regular file; it is never replaced")


def check_parent(path) -> Path:
    """The output's folder must exist, be a folder and accept new files."""
    path = Path(path)
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.exists():
        raise OutputExistsError(f"output folder {parent} does not exist")
    if not parent.is_dir():
        raise OutputExistsError(f"output folder {parent} is a file, not a folder")
    if not os.access(parent, os.W_OK):
        raise OutputExistsError(f"output folder {parent} is not writable")
    try:  # permission bits do not tell the whole story (root, read-only mounts, /sys)
        import tempfile

        with tempfile.TemporaryFile(dir=parent, prefix=".leakseg-write-test-"):
            pass
    except OSError as e:
        raise OutputExistsError(f"output folder {parent} is not writable ({e.strerror or e})") from None
    return path


def check_target(path, overwrite: bool = False, inputs: Iterable = (), *, into_folder: bool = False) -> Path:
    """The one rule for outputs (see the module docstring). ``inputs``: every path the command
    reads. ``into_folder``: the output is a folder that is written into (files added or
    replaced inside it), not replaced as a whole, so an existing folder is fine."""
    path = Path(path)
    check_not_input(path, inputs)
    if os.path.lexists(path):
        if into_folder and path.is_dir() and not path.is_symlink():
            pass
        elif not overwrite:
            raise OutputExistsError(f"output {path} exists; choose another name or pass --overwrite")
        else:
            _check_replaceable(path)
    return check_parent(path)
