"""Progress of the phases of a long run: a tqdm bar with an ETA, or one line when the phase ends.

A phase is one named stretch of work whose size is known when it starts: caching augmented views (images),
training (optimizer steps), the validation features (images). Every phase is a `phase(...)` context manager:

- `show="bar"`: a tqdm bar (`tqdm.auto`, on stderr; widgets in notebooks) with count, rate and ETA;
- `show="line"`: no bar; when the phase ends, one line on stdout says what it did and how long it took, e.g.
  `caching views: 6 views x 3000 images in 41 s (439 images/s)`, so that a log shows where the time went;
- `show="off"`: nothing (processes other than the main one, library calls that asked for no bar).

A phase opened inside an open phase that counts the same unit is a part of it: its counts go to the outer
phase, which alone shows a bar or prints a line (caching 6 views runs `encode_dataset` 6 times: one bar).
A phase of another unit inside an open one (a validation run during training) is a phase of its own; its bar
disappears when it ends, so that the outer bar stays the only one left on the screen.
"""

from __future__ import annotations

import contextvars
import sys
import time
from typing import Any

SHOW_MODES = ("bar", "line", "off")
_open_phases: contextvars.ContextVar[tuple[Phase, ...]] = contextvars.ContextVar(
    "mecoq_open_phases", default=()
)


def show_mode(progress_bar: bool, main_process: bool = True) -> str:
    """How a phase shows itself: "bar" when `progress_bar`, else "line"; "off" except on the main process."""
    if not main_process:
        return "off"
    return "bar" if progress_bar else "line"


def format_duration(seconds: float) -> str:
    """A duration as people read it: "0.4 s", "41 s", "5 min 12 s", "2 h 05 min"."""
    if seconds < 10:
        return f"{seconds:.1f} s"
    if seconds < 60:
        return f"{seconds:.0f} s"
    minutes, seconds = divmod(round(seconds), 60)
    if minutes < 60:
        return f"{minutes} min {seconds:02d} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min"


class Phase:
    """One phase of a run; use it as a context manager (`with phase(...) as progress:`).

    Args:
        name: what the phase does, as the bar and the line show it ("caching views", "training").
        total: the count the phase will reach (the bar's ETA needs it); None when unknown.
        unit: what is counted ("images", "steps"); phases of the same unit nest into one (module docstring).
        show: "bar", "line" or "off" (`show_mode` picks it from a progress flag and the process).
        summary: what the line says was done (default: the count and the unit), e.g. "6 views x 3000 images".
        initial: the count already done before this run (a resumed training's steps).

    Raises:
        ValueError: `show` is not one of `SHOW_MODES`.
    """

    def __init__(
        self,
        name: str,
        total: int | None = None,
        *,
        unit: str = "images",
        show: str = "bar",
        summary: str | None = None,
        initial: int = 0,
    ) -> None:
        if show not in SHOW_MODES:
            raise ValueError(f"show must be one of {SHOW_MODES}, got {show!r}.")
        self.name, self.total, self.unit, self.show, self.summary = name, total, unit, show, summary
        self.count = self.initial = initial
        self._outer: Phase | None = None
        self._bar: Any = None
        self._started = 0.0
        self._token: contextvars.Token | None = None

    def __enter__(self) -> Phase:
        open_phases = _open_phases.get()
        outer = open_phases[-1] if open_phases else None
        if outer is not None and outer.unit == self.unit:
            self._outer = outer
        elif self.show == "bar":
            from tqdm.auto import tqdm

            self._bar = tqdm(total=self.total, initial=self.initial, desc=self.name, unit=f" {self.unit}",
                             dynamic_ncols=True, leave=outer is None)  # fmt: skip
        self._started = time.perf_counter()
        self._token = _open_phases.set((*open_phases, self))
        return self

    def __exit__(self, exc_type: Any, exc: Any, traceback: Any) -> None:
        _open_phases.reset(self._token)
        if self._bar is not None:
            self._bar.leave = self._bar.leave and self.count > self.initial  # a bar that counted nothing goes
            self._bar.close()
        if exc_type is None and self._outer is None and self.show == "line":
            print(self.describe(time.perf_counter() - self._started), flush=True)

    def update(self, n: int = 1) -> None:
        """Count `n` more (images, steps) done."""
        self.count += n
        if self._outer is not None:
            self._outer.update(n)
        elif self._bar is not None:
            self._bar.update(n)

    def set_postfix(self, **values: Any) -> None:
        """Show `values` after the bar (e.g. `loss="4.137"`); nothing without a bar."""
        if self._bar is not None:
            self._bar.set_postfix(values, refresh=False)

    def write(self, message: str) -> None:
        """Print `message` on stdout without tearing the open bars; nothing when the phase is "off"."""
        if self.show == "off":
            return
        if any(open_phase._bar is not None for open_phase in _open_phases.get()):
            from tqdm.auto import tqdm

            tqdm.write(message, file=sys.stdout)
        else:
            print(message, flush=True)

    def describe(self, seconds: float) -> str:
        """The phase's line: `<name>: <summary> in <duration> (<rate> <unit>/s)`."""
        done = self.count - self.initial
        text = f"{self.name}: {self.summary or f'{done} {self.unit}'} in {format_duration(seconds)}"
        if done and seconds > 0:
            rate = done / seconds
            text += f" ({rate:.1f} {self.unit}/s)" if rate < 10 else f" ({rate:.0f} {self.unit}/s)"
        return text


def phase(
    name: str,
    total: int | None = None,
    *,
    unit: str = "images",
    show: str = "bar",
    summary: str | None = None,
    initial: int = 0,
) -> Phase:
    """A `Phase` to use as a context manager (see `Phase` for the arguments).

    Example:
        >>> with phase("caching views", 2 * 64, show="line", summary="2 views x 64 images") as progress:
        ...     progress.update(128)  # doctest: +ELLIPSIS
        caching views: 2 views x 64 images in 0.0 s (...)
    """
    return Phase(name, total, unit=unit, show=show, summary=summary, initial=initial)


__all__ = ["SHOW_MODES", "Phase", "format_duration", "phase", "show_mode"]
