"""Progress reporting for long work: a tqdm bar on a terminal, plain log lines elsewhere.

tqdm redraws its bar with carriage returns and, for nested bars, cursor-movement escape codes
(``ESC[A``); in a log file or a CI log these become garbage. When the stream is not a terminal,
:func:`progress_bar` writes one plain line every ``log_interval`` seconds and one at the end.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterable, Iterator
from typing import IO, Any

from tqdm.auto import tqdm


def _is_terminal(stream: IO[str]) -> bool:
    isatty = getattr(stream, "isatty", None)
    try:
        return bool(isatty and isatty())
    except ValueError:  # a closed stream
        return False


class PlainProgress:
    """A tqdm-like progress reporter that writes whole lines (no carriage returns, no escapes).

    Args:
        iterable: What to iterate, or ``None`` to call :meth:`update` by hand.
        total: The number of units (``len(iterable)`` when it has one).
        desc: A label printed at the start of each line.
        unit: The unit's name.
        file: Where the lines go (default ``sys.stderr``).
        log_interval: Seconds between two lines.
        leave: Print a final line when closed.
    """

    def __init__(
        self,
        iterable: Iterable | None = None,
        *,
        total: int | None = None,
        desc: str = "",
        unit: str = "it",
        file: IO[str] | None = None,
        log_interval: float = 30.0,
        leave: bool = True,
    ) -> None:
        self.iterable = iterable
        if total is None and iterable is not None and hasattr(iterable, "__len__"):
            total = len(iterable)  # type: ignore[arg-type]
        self.total, self.desc, self.unit = total, desc, unit
        self.file = file if file is not None else sys.stderr
        self.log_interval, self.leave = log_interval, leave
        self.n = 0
        self.postfix = ""
        self._start = self._last = time.monotonic()
        self._closed = False

    def __iter__(self) -> Iterator:
        if self.iterable is None:
            raise TypeError("This progress reporter wraps no iterable; call update() instead.")
        try:
            for item in self.iterable:
                yield item
                self.update(1)
        finally:
            self.close()

    def __enter__(self) -> PlainProgress:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def update(self, n: int = 1) -> None:
        """Count ``n`` more units done; print a line if ``log_interval`` has passed."""
        self.n += n
        now = time.monotonic()
        if now - self._last >= self.log_interval:
            self._last = now
            self._write()

    def set_postfix_str(self, text: str, refresh: bool = True) -> None:
        """Text appended to each line (e.g. the current loss)."""
        self.postfix = text

    def set_postfix(self, **values: Any) -> None:
        """``key=value`` pairs appended to each line."""
        self.postfix = ", ".join(f"{k}={v}" for k, v in values.items())

    def set_description(self, desc: str, refresh: bool = True) -> None:
        """Change the label."""
        self.desc = desc

    def write(self, text: str) -> None:
        """Print a message line."""
        print(text, file=self.file, flush=True)

    def _write(self) -> None:
        elapsed = time.monotonic() - self._start
        done = f"{self.n}/{self.total}" if self.total is not None else f"{self.n}"
        line = f"{self.desc}: {done} {self.unit} [{_clock(elapsed)}"
        if self.total and 0 < self.n < self.total:
            line += f" elapsed, ~{_clock(elapsed * (self.total - self.n) / self.n)} left"
        line += "]"
        if self.postfix:
            line += f" {self.postfix}"
        print(line, file=self.file, flush=True)

    def close(self) -> None:
        """Print the final line (once)."""
        if not self._closed:
            self._closed = True
            if self.leave:
                self._write()


def _clock(seconds: float) -> str:
    minutes, secs = divmod(int(round(seconds)), 60)
    if minutes < 60:
        return f"{minutes:02d}:{secs:02d}"
    return f"{minutes // 60}:{minutes % 60:02d}:{secs:02d}"


def progress_bar(
    iterable: Iterable | None = None,
    *,
    total: int | None = None,
    desc: str = "",
    unit: str = "it",
    enable: bool = True,
    leave: bool = True,
    file: IO[str] | None = None,
    **tqdm_kwargs: Any,
) -> Any:
    """A progress bar over ``iterable`` (or a counter advanced with ``update``).

    On a terminal this is a ``tqdm`` bar; on anything else (a log file, a pipe, CI) a
    :class:`PlainProgress` that prints whole lines every 30 s and at the end, so logs hold no
    carriage returns or escape codes. A bar nested inside another (``leave=False``) is dropped
    when not on a terminal, since interleaved lines from two counters only confuse a log.

    Args:
        iterable: What to iterate.
        total: The number of units (give it when ``iterable`` has no ``len``).
        desc: The label.
        unit: The unit's name.
        enable: ``False`` iterates silently (what ``progress=False`` means in the library).
        leave: Keep the bar when done; nested bars pass ``False``.
        file: The stream (default ``sys.stderr``).
        **tqdm_kwargs: Passed to ``tqdm`` on a terminal.

    Returns:
        An object with tqdm's ``update``, ``set_postfix_str``, ``write`` and ``close``.
    """
    stream = file if file is not None else sys.stderr
    if not enable or (not leave and not _is_terminal(stream)):
        return tqdm(iterable, total=total, disable=True)
    if _is_terminal(stream):
        return tqdm(
            iterable, total=total, desc=desc, unit=unit, leave=leave, file=stream, **tqdm_kwargs
        )
    return PlainProgress(iterable, total=total, desc=desc, unit=unit, file=stream, leave=leave)
