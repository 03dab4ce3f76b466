"""What every part of foundv2 writes and reads on disk, in one place.

- :func:`atomic_write_text`, :func:`atomic_write_bytes`, :func:`atomic_dir`: every write goes to a
  temporary name beside the target and is renamed into place, so a reader never sees half a file
  and a killed run leaves either the old file or the new one.
- The *stage output* format: a folder of Arrow stream parts (one per rank) plus ``meta.json``, which
  is written last and marks the folder complete (:func:`output_is_complete`,
  :func:`read_stage_output`). The Lightning callback that writes it lives in ``foundv2.io``; this
  module holds only the format, so ``data_modules`` reads stage outputs without importing ``foundv2``.
- :class:`Split`: the user splits and their codes in every dataset.
"""

from __future__ import annotations

import contextlib
import enum
import json
import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path

from data_modules.schema import DataError

META_FILE = "meta.json"
TMP_MARK = ".tmp-"


class Split(enum.IntEnum):
    """A user's split, as stored in the ``split`` column of every prepared and stage dataset."""

    TRAIN = 0
    VAL = 1
    TEST = 2

    @classmethod
    def code(cls, name: str) -> int:
        """``"train"`` → 0; a clear error for anything else."""
        try:
            return int(cls[name.upper()])
        except KeyError:
            raise DataError(f"unknown split {name!r}; expected one of {[s.name.lower() for s in cls]}.") from None


def _tmp_name(path: Path) -> Path:
    return path.with_name(f"{path.name}{TMP_MARK}{os.getpid()}-{uuid.uuid4().hex[:8]}")


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    """Write ``data`` to ``path`` through a temporary file beside it and a rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_name(path)
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write_bytes(path, text.encode())


def atomic_write_json(path: str | Path, obj, **dumps_kwargs) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=1, **dumps_kwargs))


@contextlib.contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """``with atomic_dir(out) as tmp:`` fill ``tmp``; on success it replaces ``out`` whole (an
    existing ``out`` is removed only then); on any error ``tmp`` is removed and ``out`` is untouched."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_name(path)
    tmp.mkdir()
    try:
        yield tmp
        old = None
        if path.exists():
            old = _tmp_name(path)
            os.replace(path, old)
        os.replace(tmp, path)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


# ------------------------------------------------------------------------------ stage outputs
def read_output_meta(folder: str | Path) -> dict | None:
    """The ``meta.json`` of a stage output, or None when there is none (or it is unreadable)."""
    try:
        return json.loads((Path(folder) / META_FILE).read_text())
    except (OSError, json.JSONDecodeError):
        return None


def output_is_complete(folder: str | Path) -> bool:
    """A stage output is complete when its ``meta.json`` exists and names parts that all exist."""
    folder = Path(folder)
    meta = read_output_meta(folder)
    return bool(meta and meta.get("parts")) and all((folder / p).exists() for p in meta["parts"])


def read_stage_output(folder: str | Path):
    """(datasets.Dataset over every part, meta) of a complete stage output folder."""
    import datasets

    folder = Path(folder)
    if not (folder / META_FILE).exists():
        raise DataError(f"{folder}: no complete stage output here (meta.json missing): run the stage's predict first.")
    try:
        meta = json.loads((folder / META_FILE).read_text())
        parts = [datasets.Dataset.from_file(str(folder / p)) for p in meta["parts"]]
    except Exception as err:
        raise DataError(f"{folder}: the stage output is corrupt ({err}); delete it and run predict again.") from err
    if not parts:
        raise DataError(f"{folder}: the stage output holds no rows.")
    return (datasets.concatenate_datasets(parts) if len(parts) > 1 else parts[0]), meta
