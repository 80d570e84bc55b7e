"""The one background-job mechanism of every widget.

``JobRunner.start(make_job, ...)`` runs a job generator (``core.jobs``) in a
napari generator ``thread_worker``:

* each yielded :class:`~napari_leakseg.core.jobs.Progress` updates a
  ``napari.utils.progress`` bar and is passed to ``on_event`` in the GUI thread
  (live previews);
* ``cancel()`` sets a token; the job gets ``JobCancelled`` at its next yield and
  may return its best result so far (``on_result(value, cancelled=True)``) —
  if it returns nothing, the previous output is left untouched;
* exceptions become napari notifications (``LeaksegError`` messages as they are,
  anything else as "<job> failed: <error>"), never console tracebacks;
* only one job at a time: a second ``start`` while one runs is refused with a
  message;
* the job thread runs at a lower CPU priority (nice ``LEAKSEG_WORKER_NICE``,
  default 10; Linux only), so that on a small machine the GUI thread (and the
  software OpenGL that draws the canvas) gets the cores first when it has work:
  the job loses little (the GUI is idle most of the time) and the viewer does not
  stall while a job trains;
* the progress bar is updated at most every ``PBAR_INTERVAL`` seconds (napari's
  progress bar widget runs ``processEvents`` on every update, which repaints the
  canvas).
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
import traceback
from typing import Any, Callable, Optional

from napari.qt.threading import thread_worker
from napari.utils import progress
from napari.utils.notifications import show_error, show_info, show_warning

from ..core.errors import LeaksegError
from ..core.jobs import CancelToken, JobResult, Progress, iterate_job

log = logging.getLogger("napari_leakseg")


#: default nice value of the job threads (``LEAKSEG_WORKER_NICE`` overrides it; 0 = unchanged)
WORKER_NICE = 10
#: seconds between two progress-bar updates of one job (the first and last always show)
PBAR_INTERVAL = 0.25


def worker_nice() -> int:
    """The nice value job threads ask for: ``LEAKSEG_WORKER_NICE`` (an integer 0-19), else 10."""
    raw = os.environ.get("LEAKSEG_WORKER_NICE", "").strip()
    if not raw:
        return WORKER_NICE
    try:
        return max(0, min(19, int(raw)))
    except ValueError:
        log.warning("LEAKSEG_WORKER_NICE=%r is not an integer; using %d", raw, WORKER_NICE)
        return WORKER_NICE


def lower_thread_priority(nice: Optional[int] = None) -> Optional[int]:
    """Give the calling thread (only it) a nice value of at least ``nice`` (default ``worker_nice()``).

    Returns the thread's nice value afterwards, or None where this is not supported
    (not Linux, where a thread id is not a process id for ``setpriority``) or refused.
    A thread's nice value is never lowered (unprivileged users could not raise it back),
    so calling it again on a reused pool thread changes nothing. Threads that this
    thread starts later (e.g. torch's OpenMP workers) inherit the value.
    """
    nice = worker_nice() if nice is None else int(nice)
    if not sys.platform.startswith("linux") or not hasattr(os, "setpriority"):
        return None
    try:
        tid = threading.get_native_id()
        cur = os.getpriority(os.PRIO_PROCESS, tid)
        if nice > cur:
            os.setpriority(os.PRIO_PROCESS, tid, nice)
        return os.getpriority(os.PRIO_PROCESS, tid)
    except OSError as e:  # pragma: no cover - e.g. a seccomp sandbox
        log.debug("could not lower the job thread's priority: %s", e)
        return None


class _Failure:
    def __init__(self, exc: BaseException):
        self.exc = exc
        self.user_error = isinstance(exc, (LeaksegError, MemoryError))
        self.tb = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))


class JobRunner:
    """Runs one job at a time for one widget."""

    def __init__(self, name: str = "job"):
        self.name = name
        self.worker = None
        self.token: Optional[CancelToken] = None
        self.pbar = None
        self.last_error: Optional[str] = None
        self.last_result: Optional[JobResult] = None
        self._on_state: list[Callable[[bool], None]] = []

    # ------------------------------------------------------------------ state
    @property
    def running(self) -> bool:
        return self.worker is not None

    def on_state_changed(self, cb: Callable[[bool], None]) -> None:
        """``cb(running)`` is called when a job starts and when it ends."""
        self._on_state.append(cb)

    def _set_state(self, running: bool) -> None:
        for cb in self._on_state:
            try:
                cb(running)
            except RuntimeError:  # widget already deleted
                pass

    # ------------------------------------------------------------------ control
    def start(
        self,
        make_job: Callable[[], Any],
        *,
        description: str = "",
        on_event: Optional[Callable[[Progress], None]] = None,
        on_result: Optional[Callable[[Any, bool], None]] = None,
        on_done: Optional[Callable[[], None]] = None,
    ) -> bool:
        """Start ``make_job()`` (a job generator) in a thread worker. Returns False if refused."""
        if self.running:
            show_info(f"{self.name}: a job is already running; press Stop or wait for it to finish.")
            return False
        desc = description or self.name
        token = CancelToken()
        self.token = token
        self.last_error = None
        self.last_result = None

        def work():
            lower_thread_priority()  # in the job thread, before the job starts any threads
            try:
                gen = make_job()
                result = yield from iterate_job(gen, lambda: token.cancelled)
                return result
            except BaseException as e:  # noqa: BLE001 - reported as a notification
                return _Failure(e)

        worker = thread_worker(work, start_thread=False)()
        self.worker = worker
        self.pbar = progress(total=0, desc=desc)
        last_pbar = [0.0, ""]  # time of the last progress-bar update, its description

        def _yielded(ev):
            if self.worker is not worker:
                return
            if isinstance(ev, Progress):
                try:
                    now = time.perf_counter()
                    if ev.total and self.pbar is not None and (
                            now - last_pbar[0] >= PBAR_INTERVAL or ev.step >= ev.total
                            or self.pbar.total != ev.total):
                        last_pbar[0] = now
                        if self.pbar.total != ev.total:
                            self.pbar.total = ev.total
                        self.pbar.n = min(ev.step, ev.total)
                        text = f"{desc}: {ev.message}" if ev.message else desc
                        if text != last_pbar[1]:  # each call repaints (napari runs processEvents)
                            last_pbar[1] = text
                            self.pbar.set_description(text)
                        self.pbar.refresh()
                except Exception:  # pragma: no cover - progress bar closed
                    pass
                if on_event is not None:
                    try:
                        on_event(ev)
                    except Exception as e:  # a preview failing must not kill the job
                        log.warning("preview failed: %s", e)

        def _returned(res):
            if isinstance(res, _Failure):
                self._report(desc, res)
                return
            self.last_result = res
            if isinstance(res, JobResult):
                if res.cancelled and res.value is None:
                    show_info(f"{desc}: stopped; the previous result was kept.")
                    return
                if on_result is not None:
                    try:
                        on_result(res.value, res.cancelled)
                    except Exception as e:
                        self._report(desc, _Failure(e))
                        return
                if res.cancelled:
                    show_info(f"{desc}: stopped; kept the result so far.")

        def _finished():
            if self.pbar is not None:
                try:
                    self.pbar.close()
                except Exception:  # pragma: no cover
                    pass
            self.pbar = None
            if self.worker is worker:
                self.worker = None
                self.token = None
            self._set_state(False)
            if on_done is not None:
                try:
                    on_done()
                except Exception as e:  # pragma: no cover
                    log.warning("on_done failed: %s", e)

        worker.yielded.connect(_yielded)
        worker.returned.connect(_returned)
        worker.finished.connect(_finished)
        # errors are caught inside work(); this only guards against the worker itself failing
        worker.errored.connect(lambda e: self._report(desc, _Failure(e)))
        self._set_state(True)
        worker.start()
        return True

    def cancel(self) -> None:
        """Ask the running job to stop at its next step (the previous result is kept)."""
        if self.token is not None:
            self.token.cancel()

    def _report(self, desc: str, failure: _Failure) -> None:
        if failure.user_error:
            msg = f"{desc}: {failure.exc}"
        else:
            msg = f"{desc} failed: {type(failure.exc).__name__}: {failure.exc}"
            log.debug(failure.tb)
        self.last_error = msg
        show_error(msg)


def notify_error(msg: str) -> None:
    show_error(msg)


def notify_warning(msg: str) -> None:
    show_warning(msg)


def notify_info(msg: str) -> None:
    show_info(msg)
