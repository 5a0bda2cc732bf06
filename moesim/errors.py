"""The one exception type moesim raises for user mistakes (bad files, bad options), and how to install an
optional dependency that is missing (`install_hint`).

The CLI prints such an error as one line, without a traceback, and exits with status 2.
"""


class MoesimError(Exception):
    """A problem with the user's input: the message names the file, field or value and what was expected."""


class TraceError(MoesimError):
    """A trace file that cannot be read or does not satisfy the trace format."""


class NotApplicable(MoesimError):
    """A strategy that cannot run on this input, through no mistake (a trace without the recorded guesses its
    prefetcher reads): a sweep keeps going and lists the cell as "not applicable: <reason>"."""


# optional dependencies -> how to install them (pyproject.toml's extras)
EXTRAS = {
    "torch": 'pip install -e ".[torch]" (with a GPU: your CUDA build of torch, https://pytorch.org)',
    "transformers": 'pip install -e ".[record]"',
    "hydra_plugins": 'pip install -e ".[sweep]"',
}


def install_hint(error: BaseException) -> str | None:
    """How to install the optional module whose absence `error` (or its cause) reports, or None."""
    while error is not None:
        if isinstance(error, ModuleNotFoundError) and (error.name or "").split(".")[0] in EXTRAS:
            return f"{error.name}, which is not installed: {EXTRAS[error.name.split('.')[0]]}"
        error = error.__cause__ or error.__context__
    return None
