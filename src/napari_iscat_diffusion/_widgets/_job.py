"""Long work in a napari thread worker, with per-step progress, Cancel and no escaping exception."""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from napari.qt.threading import create_worker
from napari.utils import progress
from qtpy.QtCore import QObject, Signal


class Report(Protocol):
    """What ``work`` gets: ``report(completed, total, text)`` after each step, True when the work should stop;
    ``report.stop_requested()`` asks the same without reporting, for checks between steps (tiles)."""

    def __call__(self, completed: int, total: int, text: str) -> bool: ...

    def stop_requested(self) -> bool: ...


@dataclass(frozen=True)
class Outcome:
    """How a job ended: its value, or the exception it raised (``cancelled`` for a requested stop)."""

    value: Any = None
    error: BaseException | None = None
    cancelled: bool = False


class _Reporter:
    """The ``Report`` a Job hands to its work: relays steps to the main thread and answers whether to stop."""

    def __init__(self, emit: Callable[[int, int, str], None], stop_requested: Callable[[], bool]) -> None:
        self._emit = emit
        self.stop_requested = stop_requested

    def __call__(self, completed: int, total: int, text: str) -> bool:
        self._emit(completed, total, text)
        return self.stop_requested()


class _Relay(QObject):
    """Lives on the main thread; signals emitted from the worker thread are queued to it."""

    reported = Signal(int, int, str)


class Job:
    """Run ``work(report)`` in a napari function worker.

    ``work`` calls ``report(completed, total, text)`` after each step; the widget's ``on_step`` and napari's
    activity dock see it on the main thread. ``report`` returns True once ``cancel()`` was called (or the
    worker was asked to quit from napari's status bar), and ``work`` then stops by raising
    ``cancel_exception``; ``report.stop_requested()`` says the same without reporting, so that ``work`` can
    stop inside a long step (``generate()`` polls it before every tile). ``on_done(Outcome)`` runs on the
    main thread when the worker has finished; any exception is handed to it instead of escaping into napari.

    A function worker with a queued signal is used rather than a generator worker: ``generate()`` reports
    from inside its sampler loop through a callback, which cannot ``yield``.
    """

    def __init__(
        self,
        work: Callable[[Report], Any],
        *,
        description: str,
        cancel_exception: type[BaseException],
        on_step: Callable[[int, int, str], None],
        on_done: Callable[[Outcome], None],
    ) -> None:
        self._cancel = threading.Event()
        self._cancel_exception = cancel_exception
        self._on_step = on_step
        self._on_done = on_done
        self._outcome = Outcome(cancelled=True)
        self._finished = False
        self._relay = _Relay()
        self._relay.reported.connect(self._step)
        self.progress = progress(total=0, desc=description)
        self.worker = create_worker(self._run, work, _start_thread=False)
        self.worker.returned.connect(self._store)
        self.worker.finished.connect(self._finish)
        self.worker.start()

    def cancel(self) -> None:
        """Ask the work to stop at its next check: the next tile's network call or the end of the step."""
        self._cancel.set()

    @property
    def running(self) -> bool:
        """True until the worker has finished."""
        return self.worker.is_running

    def _run(self, work: Callable[[Report], Any]) -> Outcome:
        try:
            return Outcome(value=work(_Reporter(self._relay.reported.emit, self._stop_requested)))
        except self._cancel_exception:
            return Outcome(cancelled=True)
        except Exception as error:  # reported by on_done as a notification; never escapes into napari
            return Outcome(error=error)

    def _stop_requested(self) -> bool:
        return self._cancel.is_set() or self.worker.abort_requested

    def _step(self, completed: int, total: int, text: str) -> None:
        if self._finished:  # a report queued before the end can be delivered after it: the job is over
            return
        # The widget first: napari's progress update below may run a nested event loop that delivers
        # ``finished``, and the widget's final status must not be overwritten by this step afterwards.
        self._on_step(completed, total, text)
        if self.progress.total != total:
            self.progress.total = total
        self.progress.update(completed - self.progress.n)
        self.progress.set_description(text)

    def _store(self, outcome: Outcome) -> None:
        self._outcome = outcome

    def _finish(self) -> None:
        self._finished = True
        self.progress.close()
        self._on_done(self._outcome)
