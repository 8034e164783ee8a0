"""Disk cache of measured latency tables (latency_table.py): timing every group at several widths
takes seconds to minutes, and the table depends only on the model, the widths timed and how and
where they are timed. One JSON file per key in $ONNX_OBS_CACHE_DIR, else $XDG_CACHE_HOME/onnx-obs,
else ~/.cache/onnx-obs. Key: SHA-256 of the model's bytes, each group's producers, unit count and
widths, and the timer's fingerprint (onnxruntime version, threads, batch, input shapes, machine).
An entry that cannot be read or does not fit is ignored (the table is measured again and
rewritten); a cache that cannot be written costs a note, never the run."""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path

import onnx

from onnx_obs.errors import first_line

FORMAT = 2   # bump when what a table holds changes (2: groups timed on their own part)


def cache_dir() -> Path:
    if os.environ.get("ONNX_OBS_CACHE_DIR"):
        return Path(os.environ["ONNX_OBS_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "onnx-obs"


def table_key(model: onnx.ModelProto, groups: list, fingerprint: dict) -> str:
    """`groups`: per group (producer names, unit count, removal counts timed)."""
    h = hashlib.sha256()
    g = model.graph   # piece by piece: a model with its weights inline may exceed 2 GB
    for part in [*model.opset_import, *model.functions, *g.input, *g.output, *g.node,
                 *g.initializer, *g.sparse_initializer]:
        h.update(part.SerializeToString(deterministic=True))
    h.update(json.dumps([FORMAT, groups, fingerprint], sort_keys=True).encode())
    return h.hexdigest()


def entry_path(key: str) -> Path:
    return cache_dir() / f"latency-{key[:32]}.json"


def load(key: str, widths: list[list[int]]) -> tuple[dict | None, str | None]:
    """(the entry stored for `key`, None if there is none or it is unusable; a note if unusable).
    An entry holds base (ms), tables (per group the latencies at widths[g], from 0) and seconds."""
    path = entry_path(key)
    if not path.exists():
        return None, None
    try:
        entry = json.loads(path.read_text())
        ok = (entry["key"] == key and isinstance(entry["base"], float)
              and [len(t) for t in entry["tables"]] == [len(w) + 1 for w in widths]
              and all(isinstance(v, float) for t in entry["tables"] for v in t))
        if not ok:
            raise ValueError("it does not match this model's groups")
    except (OSError, ValueError, KeyError, TypeError) as e:
        return None, f"latency table cache entry {path} ignored ({first_line(e)}): measured again"
    return entry, None


def store(key: str, entry: dict) -> str | None:
    """Write the entry atomically; a note if the cache cannot be written."""
    path = entry_path(key)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".latency-", suffix=".tmp")
        try:
            with os.fdopen(fd, "w") as f:
                json.dump({"key": key, **entry}, f)
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    except OSError as e:
        return (f"the latency table could not be cached in {path.parent} ({first_line(e)}): "
                "set ONNX_OBS_CACHE_DIR to a writable folder")
    return None

