"""What every part of foundv2 writes and reads on disk, in one place.

- :func:`atomic_write_text`, :func:`atomic_write_bytes`, :func:`atomic_dir`: every write goes to a
  temporary name beside the target and is renamed into place, so a reader never sees half a file
  and a killed run leaves either the old file or the new one.
- The *stage output* format: a folder of Arrow stream parts (one per rank) plus ``meta.json``, which
  is written last and marks the folder complete (:func:`output_is_complete`,
  :func:`read_stage_output`). The Lightning callback that writes it lives in ``foundv2.io``; this
  module holds only the format, so ``data_modules`` reads stage outputs without importing ``foundv2``.
- Checksums: :func:`file_digest` (blake2b-128), a file's record (digest and size) kept beside it
  (:func:`write_sidecar` / :func:`verify_sidecar`: checkpoints) or a folder's ``checksums.json``
  (:func:`write_checksums` / :func:`verify_checksums`: exports); a mismatch is a DataError naming
  the file and the fix. :func:`save_export` / :func:`load_export`: a ``save_pretrained`` folder
  (``config.json``, ``model.safetensors``, ``checksums.json``), verified and NaN-free on load
  (:func:`check_finite`, which checkpoints share). A checkpoint or an export without its record is
  refused unless the user allows it (:data:`ALLOW_NO_CHECKSUM_FLAG`, :func:`no_checksum_allowed`).
- :func:`check_writable` / :func:`check_output_folder`: an output folder's writability (and, for a
  folder replaced whole, that it holds nothing else), checked before any long work.
- :func:`remove_dead_tmp`: temporaries (``<name>.tmp-<pid>-<id>``) whose writer is dead, removed.
- :class:`Split`: the user splits and their codes in every dataset.
"""

from __future__ import annotations

import contextlib
import enum
import hashlib
import json
import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path

from data_modules.schema import DataError

META_FILE = "meta.json"
TMP_MARK = ".tmp-"
#: a file's checksum record beside it: ``last.ckpt`` → ``last.ckpt.checksum``
SIDECAR_SUFFIX = ".checksum"
#: a folder's checksum records, one per file (exports)
CHECKSUMS_FILE = "checksums.json"
#: the files of an export folder (``save_pretrained``)
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
#: how a user says to use a checkpoint or an export that carries no checksum record (written by
#: another tool or an older foundv2, or copied without it): a flag of every ``foundv2`` command
#: (``foundv2.cli`` turns it into the environment variable, which DDP ranks and subprocesses inherit)
ALLOW_NO_CHECKSUM_FLAG = "--allow_no_checksum"
ALLOW_NO_CHECKSUM_ENV = "FOUNDV2_ALLOW_NO_CHECKSUM"
#: how a message tells the user so
ALLOW_NO_CHECKSUM_HOW = f"pass {ALLOW_NO_CHECKSUM_FLAG} (or set {ALLOW_NO_CHECKSUM_ENV}=1)"


def no_checksum_allowed() -> bool:
    """Whether the user allowed checkpoints and exports without a checksum record (they are still
    checked for NaN/inf, and checkpoints are read with torch's weights-only loader)."""
    return os.environ.get(ALLOW_NO_CHECKSUM_ENV, "").strip().lower() in ("1", "true", "yes")


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


def tmp_name(path: Path) -> Path:
    """A unique temporary name beside ``path`` (``<name>.tmp-<pid>-<id>``)."""
    path = Path(path)
    return path.with_name(f"{path.name}{TMP_MARK}{os.getpid()}-{uuid.uuid4().hex[:8]}")



def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    """Write ``data`` to ``path`` through a temporary file beside it and a rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = tmp_name(path)
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
    tmp = tmp_name(path)
    tmp.mkdir()
    try:
        yield tmp
        replace_dir(tmp, path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def replace_dir(src: str | Path, dst: str | Path) -> None:
    """Put the complete folder ``src`` in place of ``dst`` (which may exist): the old one is moved
    aside first and removed only once the new one is in place."""
    src, dst = Path(src), Path(dst)
    old = None
    if dst.exists():
        old = tmp_name(dst)
        os.replace(dst, old)
    os.replace(src, dst)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def check_writable(folder: str | Path, what: str, fix: str) -> None:
    """Raise DataError unless a file can be created in ``folder`` (or, when it does not exist yet,
    in its nearest existing parent, where it would be made): before any long work, not after.
    Nothing is left behind."""
    folder = Path(folder).absolute()
    probe_in = next(p for p in (folder, *folder.parents) if p.exists())
    if not probe_in.is_dir():
        where = "" if probe_in == folder else f" (the {what} folder {folder} would be made in it)"
        raise DataError(f"{probe_in} is a file, not a folder{where}; {fix}.")
    try:
        probe = probe_in / f".write-test-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as err:
        where = "" if probe_in == folder else f" (it would be made in {probe_in})"
        raise DataError(f"{folder}: the {what} folder is not writable{where} ({type(err).__name__}: "
                        f"{err.strerror or err}); {fix}.") from None


def check_output_folder(folder: str | Path, what: str, fix: str) -> None:
    """A folder written aside in its parent and swapped in whole (a stage output, a tokens
    dataset, embeddings): its parent (where it is written aside) and the folder itself, when it
    exists, must be writable, and it must hold nothing the swap would delete
    (:func:`check_replaceable`). A DataError naming it, before any work."""
    folder = Path(folder).absolute()
    check_writable(folder.parent, what, fix)
    if folder.exists():
        check_writable(folder, what, fix)
    check_replaceable(folder)


def tmp_owner(path: str | Path) -> int | None:
    """The pid a temporary name records (``<name>.tmp-<pid>-<id>``); None when it records none."""
    name = Path(path).name
    if TMP_MARK not in name:
        return None
    pid = name.rsplit(TMP_MARK, 1)[1].split("-", 1)[0]
    return int(pid) if pid.isdigit() else None


def remove_dead_tmp(folder: str | Path, prefix: str = "", recursive: bool = False) -> list[Path]:
    """Remove the temporary files and folders in ``folder`` (``<prefix>...tmp-<pid>-<id>``, at any
    depth with ``recursive``) whose writer, a process of this host, is dead: what a killed run
    left. Returns them."""
    from data_modules.text import pid_alive

    folder = Path(folder)
    if not folder.is_dir():
        return []
    pattern = f"{prefix}*{TMP_MARK}*"
    removed = []
    for p in sorted(folder.rglob(pattern) if recursive else folder.glob(pattern)):
        pid = tmp_owner(p)
        if pid is None or pid == os.getpid() or pid_alive(pid):
            continue
        try:
            shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()
        except FileNotFoundError:  # inside one removed already
            continue
        removed.append(p)
    return removed


# ------------------------------------------------------------------------------ checksums
def file_digest(path: str | Path) -> str:
    """blake2b-128 of a file's bytes: the checksum every record here keeps."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, lambda: hashlib.blake2b(digest_size=16)).hexdigest()


def file_record(path: str | Path) -> dict:
    """What a checksum record keeps of a file: its digest and size."""
    return {"blake2b_128": file_digest(path), "bytes": Path(path).stat().st_size}


def _whole_text(path: Path) -> bool:
    """Whether ``path`` is a JSON or YAML file that still parses: changed by hand or by a tool, not
    cut short or bit-flipped."""
    if path.suffix not in (".json", ".yaml", ".yml"):
        return False
    try:
        text = path.read_text()
        if path.suffix == ".json":
            json.loads(text)
        else:
            import yaml

            yaml.safe_load(text)
    except Exception:  # noqa: BLE001 - unreadable or unparsable: not whole
        return False
    return True


def check_file(path: str | Path, record: dict, what: str, fix: str) -> None:
    """Raise DataError when ``path`` is missing, or its size or digest differ from ``record``. The
    message says what the difference shows: a file that still parses (a config) was changed since
    it was written; a shorter one is cut short (or changed); other bytes are corruption."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: the {what} is missing; {fix}.")
    size = path.stat().st_size
    written = record.get("bytes", size)
    if size == written and file_digest(path) == record.get("blake2b_128"):
        return
    if _whole_text(path):
        differ = "size and checksum differ" if size != written else "checksum differs"
        raise DataError(f"{path}: the {what} was changed since it was written (its {differ}: {size} bytes now, "
                        f"{written} written); {fix}.")
    if size < written:
        raise DataError(f"{path}: the {what} is truncated ({size} bytes, {written} were written), or was changed "
                        f"since; {fix}.")
    if size > written:
        raise DataError(f"{path}: the {what} was changed since it was written ({size} bytes now, {written} "
                        f"written); {fix}.")
    raise DataError(f"{path}: checksum mismatch, the {what} is corrupt (its bytes changed since it was "
                    f"written); {fix}.")


def sidecar(path: str | Path) -> Path:
    """Where the checksum record of ``path`` is kept."""
    path = Path(path)
    return path.with_name(path.name + SIDECAR_SUFFIX)


def write_sidecar(path: str | Path, record_of: str | Path | None = None) -> Path:
    """Record ``path``'s checksum beside it (from ``record_of``, the same bytes under another name,
    e.g. the temporary file about to be renamed to ``path``)."""
    return atomic_write_json(sidecar(path), file_record(record_of or path))


def verify_sidecar(path: str | Path, what: str, fix: str) -> bool:
    """Check ``path`` against the record beside it; False when it has none (written elsewhere)."""
    path = Path(path)
    for candidate in dict.fromkeys((sidecar(path), sidecar(path.resolve()))):  # a link: its target's record
        if candidate.exists():
            try:
                record = json.loads(candidate.read_text())
            except (OSError, json.JSONDecodeError) as err:
                raise DataError(f"{candidate}: the checksum record of the {what} is unreadable ({err}); {fix}.") from None
            check_file(path, record, what, fix)
            return True
    return False


def write_checksums(folder: str | Path) -> Path:
    """Record the checksum of every file in ``folder`` in its ``checksums.json``."""
    folder = Path(folder)
    records = {p.name: file_record(p) for p in sorted(folder.iterdir()) if p.is_file() and p.name != CHECKSUMS_FILE}
    return atomic_write_json(folder / CHECKSUMS_FILE, records)


def verify_checksums(folder: str | Path, what: str, fix: str) -> bool:
    """Check every file ``checksums.json`` lists; False when the folder has none (written before checksums)."""
    folder = Path(folder)
    if not (folder / CHECKSUMS_FILE).exists():
        return False
    try:
        records = json.loads((folder / CHECKSUMS_FILE).read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise DataError(f"{folder / CHECKSUMS_FILE}: the {what}'s checksums are unreadable ({err}); {fix}.") from None
    for name, record in records.items():
        check_file(folder / name, record, what, fix)
    return True


# ------------------------------------------------------------------------------ exports
def save_export(folder: str | Path, config: dict, state: dict) -> None:
    """A ``save_pretrained`` folder: ``config.json``, ``model.safetensors`` (``state``: name →
    tensor) and their ``checksums.json``, written aside and swapped in whole."""
    from safetensors.torch import save_file

    state = {k: v.detach().cpu().contiguous() for k, v in state.items()}
    with atomic_dir(folder) as tmp:
        atomic_write_json(tmp / CONFIG_FILE, config)
        save_file(state, str(tmp / WEIGHTS_FILE))
        write_checksums(tmp)


def reexport_command(folder: str | Path) -> str:
    """The command that writes an export folder again: its fit resumed from its last checkpoint
    (a finished fit trains no further; its end writes the export). The fit's saved config and
    checkpoint are named when the folder beside the export holds exactly one ``last.ckpt``
    (a pipeline step folder, a fit's default_root_dir); else placeholders."""
    folder = Path(folder).absolute()
    lasts = sorted(folder.parent.glob("*/version_*/checkpoints/last.ckpt")) + sorted(
        folder.parent.glob("checkpoints/last.ckpt"))
    config, ckpt = "<the fit's config.yaml>", "<the fit's last.ckpt>"
    if len(lasts) == 1:
        ckpt = str(lasts[0])
        if (lasts[0].parent.parent / "config.yaml").is_file():
            config = str(lasts[0].parent.parent / "config.yaml")
    return f"foundv2 fit --config {config} --ckpt_path {ckpt} --model.export_dir {folder}"


def check_finite(state: dict, where: str | Path, what: str) -> None:
    """Raise DataError naming the tensors of ``state`` (name → tensor; other values are skipped)
    that hold NaN or inf: weights of a fit that diverged."""
    import torch

    bad = [k for k, v in state.items()
           if isinstance(v, torch.Tensor) and v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        raise DataError(f"{where}: the {what}'s weights hold NaN or inf ({', '.join(bad[:3])}"
                        f"{f' and {len(bad) - 3} more' if len(bad) > 3 else ''}); the fit that wrote them diverged: "
                        f"train it again (a lower lr, check the inputs).")


def verify_export(folder: str | Path, what: str = "export") -> None:
    """Check a :func:`save_export` folder's files against its ``checksums.json`` (DataError naming
    the file and the command that exports it again); a folder without one is refused unless the
    user allows it (:func:`no_checksum_allowed`)."""
    folder = Path(folder)
    fix = f"export it again: {reexport_command(folder)}"
    if not (folder / CONFIG_FILE).is_file():
        raise DataError(f"{folder}: not a {what} folder (no {CONFIG_FILE}); pass the folder save_pretrained wrote "
                        f"(the fit's export_dir).")
    if not verify_checksums(folder, what, fix) and not no_checksum_allowed():
        raise DataError(f"{folder}: the {what} has no {CHECKSUMS_FILE}, so its files cannot be checked against what "
                        f"was written (written by an older foundv2, or copied without it); {fix}. To use it as it "
                        f"is, {ALLOW_NO_CHECKSUM_HOW}.")


def load_export(folder: str | Path, what: str = "export", device: str = "cpu") -> tuple[dict, dict]:
    """(config, state) of a :func:`save_export` folder, its checksums verified
    (:func:`verify_export`) and its weights finite (:func:`check_finite`); any damage is a
    DataError naming the file and the fix."""
    from safetensors.torch import load_file

    folder = Path(folder)
    fix = f"export it again: {reexport_command(folder)}"
    verify_export(folder, what)
    try:
        config = json.loads((folder / CONFIG_FILE).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise DataError(f"{folder / CONFIG_FILE}: the {what}'s config cannot be read ({err}); {fix}.") from None
    try:
        state = load_file(str(folder / WEIGHTS_FILE), device=str(device))
    except Exception as err:  # noqa: BLE001 - safetensors raises its own, OSError, ValueError ...
        raise DataError(f"{folder / WEIGHTS_FILE}: the {what}'s weights cannot be read ({type(err).__name__}: "
                        f"{str(err).splitlines()[0] if str(err) else ''}); {fix}.") from None
    check_finite(state, folder / WEIGHTS_FILE, what)
    return config, state


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


def check_replaceable(folder: str | Path) -> None:
    """A predict replaces its output folder whole: refuse (DataError) a folder that exists and is
    not a stage output (no ``meta.json``, and files other than parts, ``report.json`` and the
    ``datasets`` state files), which the swap would delete."""
    folder = Path(folder)
    if not folder.exists() or (folder / META_FILE).exists():
        return
    if not folder.is_dir():
        raise DataError(f"{folder} is a file, not a folder; pass a folder for the stage's output.")
    others = sorted(p.name for p in folder.iterdir()
                    if not (p.name.startswith("part-rank") or p.name in (META_FILE, "report.json", HF_STATE, HF_INFO)))
    if others:
        raise DataError(f"{folder}: the output folder exists and is not a stage output (it holds "
                        f"{', '.join(others[:3])}{' ...' if len(others) > 3 else ''}); the output replaces this "
                        f"folder whole, so pass a new folder or empty this one.")


#: the files that make a stage output a Hugging Face ``datasets`` folder (``datasets.load_from_disk``)
HF_STATE, HF_INFO = "state.json", "dataset_info.json"


def write_output_meta(folder: str | Path, meta: dict) -> None:
    """Finish a stage output folder whose parts (Arrow streams, ``meta["parts"]``) are written:
    ``state.json`` and ``dataset_info.json``, so that ``datasets.load_from_disk(folder)`` opens
    the parts as one dataset, then ``meta.json`` last (its presence marks the output complete)."""
    import datasets
    import pyarrow as pa

    folder = Path(folder)
    schema = None
    for part in meta["parts"]:
        with pa.memory_map(str(folder / part)) as source:
            schema = pa.ipc.open_stream(source).schema
        break
    info = {"features": datasets.Features.from_arrow_schema(schema).to_dict()} if schema is not None else {}
    atomic_write_json(folder / HF_INFO, info)
    fingerprint = hashlib.sha256(json.dumps(meta, sort_keys=True, default=str).encode()).hexdigest()[:16]
    atomic_write_json(folder / HF_STATE, {"_data_files": [{"filename": p} for p in meta["parts"]],
                                          "_fingerprint": fingerprint, "_format_columns": None, "_format_kwargs": {},
                                          "_format_type": None, "_output_all_columns": False, "_split": None})
    atomic_write_json(folder / META_FILE, meta, default=str)


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
