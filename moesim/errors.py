"""The one exception type moesim raises for user mistakes (bad files, bad options).

The CLI prints such an error as one line, without a traceback, and exits with status 2.
"""


class MoesimError(Exception):
    """A problem with the user's input: the message names the file, field or value and what was expected."""


class TraceError(MoesimError):
    """A trace file that cannot be read or does not satisfy the trace format."""


class NotApplicable(MoesimError):
    """A strategy that cannot run on this input, through no mistake (a trace without the recorded guesses its
    prefetcher reads): a sweep keeps going and lists the cell as "not applicable: <reason>"."""
