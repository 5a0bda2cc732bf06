"""Atomic file writes: every file moesim writes appears whole or not at all.

    atomic_write(path, lambda tmp: frame.to_parquet(tmp))

The content goes to a temp file in the same directory, which is then renamed over `path` (os.replace is
atomic on one file system), so a run killed at any moment never leaves a half-written file that looks
complete. The file gets the usual permissions (0666 less the umask), not mkstemp's private 0600.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Callable


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> Path:
    """Call `write(temp_path)`, then rename the temp file to `path`; on any failure remove the temp file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".tmp-{path.name}-", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write `text` (UTF-8) to `path` atomically."""
    return atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


YAML_MAX_BYTES = 4 * 2**20  # a results directory's config.yaml or a hardware profile is a few KB


def read_yaml(path: str | os.PathLike):
    """A YAML file from someone else (a results directory's config.yaml, a hardware profile), parsed with the
    safe loader and without aliases (an alias bomb of a few KB expands to gigabytes), at most YAML_MAX_BYTES and
    nested at most as deep as Python's recursion allows. Raises ValueError with the reason, OSError as open()."""
    import yaml

    class NoAliases(yaml.SafeLoader):
        def compose_node(self, parent, index):
            if self.check_event(yaml.events.AliasEvent):
                mark = self.peek_event().start_mark
                raise ValueError(f"line {mark.line + 1}: YAML aliases (*name) are not accepted here")
            return super().compose_node(parent, index)

    path = Path(path)
    size = path.stat().st_size
    if size > YAML_MAX_BYTES:
        raise ValueError(f"{size:,} bytes, more than the {YAML_MAX_BYTES:,} such a file may have")
    try:
        return yaml.load(path.read_text(encoding="utf-8"), Loader=NoAliases)  # noqa: S506  a SafeLoader
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise ValueError(f"not valid YAML ({' '.join(str(e).split())})") from None
    except RecursionError:
        raise ValueError("nested too deeply") from None
