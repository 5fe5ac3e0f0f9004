"""Progress bars that also reach log files: the one way every long phase reports progress and ETA.

On a terminal this is a plain tqdm bar. When stderr is not a terminal (output sent to a log file, a job
scheduler, `nohup`), tqdm's carriage-return redraws would be one endless line or, with `disable=None`,
nothing at all; there the bar writes one log line (`secateurs.progress`, INFO) at most every
`LOG_INTERVAL_S` seconds, with the count, rate and ETA, so a one-hour run shows where it is. With
data-parallel workers only rank 0 shows a bar.
"""

from __future__ import annotations

import logging
import sys

from tqdm.auto import tqdm

log = logging.getLogger(__name__)

LOG_INTERVAL_S = 30.0  # between progress lines in a log: often enough to see a run move, not a flood


class _LogLines:
    """A file-like target for tqdm that turns each redraw into one log line."""

    def write(self, text: str) -> None:
        line = text.strip("\r\n ")
        if line:
            log.info(line)

    def flush(self) -> None:
        pass


def progress(
    iterable=None,
    *,
    total: int | None = None,
    desc: str = "",
    unit: str = "it",
    initial: int = 0,
    leave: bool = True,
) -> tqdm:
    """A tqdm bar (use as an iterable wrapper or a context manager with `.update`), logged off a terminal."""
    from secateurs import distributed

    if not distributed.is_main():
        return tqdm(iterable, total=total, initial=initial, disable=True)
    if sys.stderr.isatty():
        return tqdm(iterable, total=total, desc=desc, unit=unit, initial=initial, leave=leave)
    return tqdm(
        iterable,
        total=total,
        desc=desc,
        unit=unit,
        initial=initial,
        file=_LogLines(),
        mininterval=LOG_INTERVAL_S,
        maxinterval=LOG_INTERVAL_S,
        ascii=True,
        ncols=100,
    )
