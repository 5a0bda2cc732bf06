"""The model catalogue: named models (`model=NAME`, synthetic presets, a trace's model) as ModelSpecs, each
built by moesim.hf_config from the released config.json keys stored in moesim/data/models/<name>.json.

    from moesim.catalogue import MODEL_SPECS, model_source
    MODEL_SPECS["gpt-oss-20b"].bytes_per_expert
    model_source("deepseek-v3")      # where its config was read, and when
    python scripts/model_table.py    # docs/models.md: bytes and parameters of every entry vs its publisher

Each data file holds {"name", "hf_repo", "source" (url or repo@commit:path of the copy read), "read_on",
"notes", "config" (the config.json keys moesim reads, verbatim)}. To add a model, store its config the same
way; one code path reads the catalogue and a user's `model.config=path/to/config.json`.
"""
from __future__ import annotations

import json
from importlib import resources

from .errors import MoesimError
from .hf_config import spec_from_hf_config
from .models import ModelSpec

_DATA = resources.files("moesim") / "data" / "models"


def _entries() -> dict[str, dict]:
    """name -> the stored entry, in file-name order."""
    out = {}
    for f in sorted(_DATA.iterdir(), key=lambda p: p.name):
        if not f.name.endswith(".json"):
            continue
        entry = json.loads(f.read_text())
        missing = [k for k in ("name", "hf_repo", "source", "read_on", "config") if k not in entry]
        if missing or entry["name"] != f.name[:-5]:
            raise MoesimError(f"moesim/data/models/{f.name}: expected keys name (= the file's name), hf_repo, "
                              f"source, read_on, config; missing {missing}")
        out[entry["name"]] = entry
    return out


ENTRIES: dict[str, dict] = _entries()
MODEL_SPECS: dict[str, ModelSpec] = {
    name: spec_from_hf_config(e["config"], name=name) for name, e in ENTRIES.items()}


def model_source(name: str) -> dict:
    """Where the catalogue entry `name` was read: hf_repo, source, read_on, notes."""
    if name not in ENTRIES:
        raise MoesimError(f"model: unknown preset {name!r}; known: {', '.join(ENTRIES)}")
    return {k: v for k, v in ENTRIES[name].items() if k != "config"}
