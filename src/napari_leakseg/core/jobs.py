"""One job protocol for every long computation.

A *job* is a generator. It ``yield``s :class:`Progress` events (with optional
partial results for live previews) and ``return``s its final result. The same
generator is driven

* from Python and the CLI by :func:`run_job` (optionally with a callback that
  can ask it to stop), and
* from napari by ``napari_leakseg._napari.workers.JobRunner`` inside a
  ``thread_worker``.

Cancelling throws :class:`~napari_leakseg.core.errors.JobCancelled` into the
generator at its current ``yield``. A job that can keep a useful result (the
best model so far, the last label map) catches it and ``return``s that result;
otherwise the exception propagates and the caller keeps its previous result.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Generator, Optional

from .errors import JobCancelled

__all__ = [
    "Progress",
    "JobResult",
    "CancelToken",
    "run_job",
    "JobCancelled",
    "Job",
]


@dataclass
class Progress:
    """One progress event.

    step/total: progress counters (total may be None when unknown).
    message:    short human-readable status ("iter 40: 6 segments").
    preview:    optional partial result for live display (e.g. a label map).
    metrics:    optional numbers (loss, n_segments, val_ssim...).
    """

    step: int
    total: Optional[int] = None
    message: str = ""
    preview: Any = None
    metrics: dict = field(default_factory=dict)
    time: float = field(default_factory=time.perf_counter)

    @property
    def fraction(self) -> Optional[float]:
        if not self.total:
            return None
        return min(1.0, max(0.0, self.step / self.total))


Job = Generator[Progress, None, Any]


@dataclass
class JobResult:
    """What a driven job produced. ``value`` is None if it was cancelled without a result."""

    value: Any
    cancelled: bool = False
    events: int = 0
    seconds: float = 0.0


class CancelToken:
    """A thread-safe flag the GUI (or any caller) sets to ask a job to stop."""

    def __init__(self) -> None:
        self._event = threading.Event()

    def cancel(self) -> None:
        self._event.set()

    @property
    def cancelled(self) -> bool:
        return self._event.is_set()

    __bool__ = lambda self: self.cancelled  # noqa: E731


def iterate_job(
    gen: Job, should_stop: Callable[[], bool] = lambda: False
) -> Generator[Progress, None, JobResult]:
    """Re-yield a job's events, throwing ``JobCancelled`` in when ``should_stop()``.

    Returns a :class:`JobResult` (as the generator's return value). Used by both
    :func:`run_job` and the napari worker, so cancel semantics are identical.
    """
    t0 = time.perf_counter()
    n = 0
    try:
        ev = next(gen)
        while True:
            n += 1
            yield ev
            if should_stop():
                try:
                    gen.throw(JobCancelled())
                except StopIteration as stop:
                    return JobResult(stop.value, True, n, time.perf_counter() - t0)
                except JobCancelled:
                    return JobResult(None, True, n, time.perf_counter() - t0)
                # The job yielded again after being cancelled: close it for good.
                gen.close()
                return JobResult(None, True, n, time.perf_counter() - t0)
            ev = next(gen)
    except StopIteration as stop:
        return JobResult(stop.value, False, n, time.perf_counter() - t0)


def run_job(
    gen: Job,
    callback: Optional[Callable[[Progress], Optional[bool]]] = None,
    cancel: Optional[CancelToken] = None,
) -> JobResult:
    """Drive a job to the end in this thread.

    ``callback(event)`` sees every event; returning ``False`` from it cancels the
    job (as does setting ``cancel``).
    """
    stop_flag = [False]

    def should_stop() -> bool:
        return stop_flag[0] or bool(cancel is not None and cancel.cancelled)

    it = iterate_job(gen, should_stop)
    try:
        while True:
            ev = next(it)
            if callback is not None and callback(ev) is False:
                stop_flag[0] = True
    except StopIteration as stop:
        return stop.value


def result_of(gen: Job, callback=None) -> Any:
    """Drive a job and return its value (raises ``JobCancelled`` if cancelled without a result)."""
    res = run_job(gen, callback)
    if res.cancelled and res.value is None:
        raise JobCancelled()
    return res.value


class Throttle:
    """Limit how often previews are produced: ``if throttle(): yield preview``."""

    def __init__(self, interval_s: float = 0.25) -> None:
        self.interval = interval_s
        self._last = -1e9

    def __call__(self, force: bool = False) -> bool:
        now = time.perf_counter()
        if force or now - self._last >= self.interval:
            self._last = now
            return True
        return False


def check_timeout(seconds, what: str = "timeout") -> float:
    """A wait limit: a finite number of seconds above 0 (every wait in the plugin has one)."""
    import math

    from .errors import InputError

    try:
        s = float(seconds)
    except (TypeError, ValueError):
        raise InputError(f"{what} must be a number of seconds, got {seconds!r:.40}") from None
    if not math.isfinite(s) or s <= 0:
        raise InputError(f"{what} must be a positive, finite number of seconds, got {seconds!r:.40}")
    return s


class DeadlineExceeded(TimeoutError):
    """:func:`call_with_deadline`: the call did not finish in time (it is left to finish or
    fail on its own in a daemon thread; nothing waits for it)."""


def call_with_deadline(fn, seconds: float, name: str = "leakseg-deadline"):
    """Run ``fn()`` and return its value, or raise :class:`DeadlineExceeded` after ``seconds``.

    For calls into libraries that can block without a limit of their own (a network peer that
    accepts a connection and never answers). ``fn`` runs in a daemon thread, so a call that
    never returns does not keep the process alive; its exception is re-raised here."""
    import threading

    box: dict = {}

    def target():
        try:
            box["value"] = fn()
        except BaseException as e:  # noqa: BLE001 - re-raised in the caller's thread
            box["error"] = e

    t = threading.Thread(target=target, name=name, daemon=True)
    t.start()
    t.join(check_timeout(seconds))
    if t.is_alive():
        raise DeadlineExceeded(f"no answer within {seconds:g} s")
    if "error" in box:
        raise box["error"]
    return box.get("value")


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised in the main thread like Ctrl-C so that the same ``finally`` blocks run
    (staging folders and temporary files are removed) before the process ends."""


class sigterm_as_interrupt:
    """Context manager: inside it, SIGTERM raises :class:`Terminated` in the main thread (as
    SIGINT raises KeyboardInterrupt); the previous handler is restored on exit. Does nothing
    outside the main thread or where the platform has no SIGTERM."""

    def __enter__(self):
        import signal
        import threading

        self.old = None
        if threading.current_thread() is threading.main_thread() and hasattr(signal, "SIGTERM"):
            def _raise(signum, frame):
                raise Terminated()

            self.old = signal.signal(signal.SIGTERM, _raise)
        return self

    def __exit__(self, *exc):
        import signal

        if self.old is not None:
            signal.signal(signal.SIGTERM, self.old)
        return False
