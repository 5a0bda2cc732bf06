"""Progress of long jobs on stderr: a live bar on a terminal, a line every LINE_EVERY_S seconds otherwise (a
log, CI, `... 2>run.log`; nothing for a job shorter than that), so that no job runs for minutes without a
word.

    for step in progress(steps, total=n, desc="replay", unit="step"):
        ...
"""
from __future__ import annotations

import sys

LINE_EVERY_S = 30.0  # seconds between progress lines when stderr is not a terminal


class _Lines:
    """stderr for a bar that is not on a terminal: each refresh is a line of its own (tqdm rewrites one line with
    carriage returns, which a log file shows as one endless line)."""

    def write(self, text: str) -> None:
        text = text.replace("\r", "").strip()
        if text:
            sys.stderr.write(text + "\n")

    def flush(self) -> None:
        sys.stderr.flush()


def progress(iterable=None, *, total=None, desc: str = "", unit: str = "it", enabled: bool = True,
             mininterval: float = 0.5):
    """A tqdm bar over `iterable` (or to update by hand) on stderr: live on a terminal, else a line every
    LINE_EVERY_S seconds; `enabled=False`: none (the bar still counts, silently)."""
    from tqdm import tqdm

    if not enabled:
        return tqdm(iterable, total=total, desc=desc, unit=unit, disable=True)
    if sys.stderr.isatty():
        return tqdm(iterable, total=total, desc=desc, unit=unit, file=sys.stderr, mininterval=mininterval)
    return tqdm(iterable, total=total, desc=desc, unit=unit, file=_Lines(), mininterval=LINE_EVERY_S,
                maxinterval=LINE_EVERY_S, delay=LINE_EVERY_S, ascii=True, ncols=100)  # a short job: no line
