"""Tokens appended one window at a time: ``foundv2 tokenize --append``.

A deployment tokenizes today's events of its users without re-encoding their past. Stage 1's
Q-Former is causal (a window's view depends on windows ≤ it only), so the views of a user's new
windows need only the new events plus what the earlier windows left behind: the per-layer keys
and values of their query tokens and of the memory (null slot, profile, encoded events), kept
in a :class:`~foundv2.nn.qformer.QFormerCache`. Appending then runs the event encoder on the new
events, :meth:`~foundv2.nn.qformer.CausalQFormer.forward_window` on the new windows and the
tokenizer on the new slices; the earlier windows' codes are copied, bit for bit.

**Input.** ``--tokens`` a tokens dataset (the tokenizer's predict output, or an earlier append's),
``--events`` a CSV/TSV/Parquet file, or a folder of them, in the canonical events schema (the
``files`` loader's: ``user_id, source, timestamp`` and optional ``item_id, text, value,
category``), ``--qformer`` the stage-1 checkpoint and ``--tokenizer`` the tokenizer folder that
made the dataset, ``--config`` the data config it was made from (spec, item and text tables,
window mode, text encoder). Items the prepared data never saw become "no item", categories
outside the vocabulary "no category" (both counted in the log and the report); new texts are
encoded with the data's text encoder through the shared text cache.

**Windows.** New events are cut into windows as the data config says: ``day`` / ``week`` keys
from the calendar; ``events`` windows of ``window_size`` distinct moments numbered on from the
user's last window (the last, possibly partial, window is closed). Every new event must come
after the user's last window (a later calendar key; for ``events`` windows, a later timestamp
than the user's last event); a window is final once tokenized. A user's windows after the
append must fit the Q-Former's window table (``max_windows``). The ``max_events`` cap of the
data module is not re-applied: the cache keeps what the first encoding kept plus every new event.

**Output.** ``--output``, a new tokens dataset version (the input is never changed), written
aside and renamed into place whole: the tokens part (every user; appended users get their new
slices after their old ones, ``slice_window`` numbered on), ``meta.json`` (the input's, plus an
``append`` record), ``report.json`` (collisions and storage, recomputed) and ``append_cache/``:

    append_cache/cache.json   format, identity (blake2b of the stage-1 and tokenizer weights),
                              model sizes, the kv parts in order
    append_cache/users.arrow  per user: windows encoded, last window key, last event time
    append_cache/kv-NNNNN.arrow  per user (any order; looked up by id): the rows one version adds to
                              the user's :class:`~foundv2.nn.qformer.QFormerCache` (the normalised
                              self-attention inputs of the query tokens in blocks 1.., the memory
                              tokens once; kv-00000: the first encoding of the history; one more
                              part per append), float16 by default (``--cache_dtype``)

A version's kv parts are hard links to the previous version's plus its own delta (a copy where
links are impossible), so an append writes only what it adds. With no ``append_cache/`` beside
the input (a dataset straight from the tokenizer's predict) the first append builds it: one
stage-1 pass over the prepared history, whose codes must reproduce the stored ones — which is
also the proof that ``--qformer`` and ``--tokenizer`` made the dataset. Later appends compare
the weights' digests with the cache's. Any bad input (schema, unknown users, events older than
a user's last window, another model, too many windows) raises a one-paragraph
:class:`~data_modules.schema.DataError` before anything is written.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import torch

from data_modules.prepare import SECONDS_PER_DAY, window_keys, window_ordinals
from data_modules.schema import DataError, codes_of, validate_events
from data_modules.store import atomic_dir, atomic_write_json, read_stage_output, write_output_meta
from foundv2.nn.qformer import QFormerCache

log = logging.getLogger(__name__)

CACHE_DIR = "append_cache"
CACHE_META = "cache.json"
CACHE_USERS = "users.arrow"
CACHE_FORMAT = 2
#: how an append cache may store its numbers (``--cache_dtype``)
CACHE_DTYPES = ("float16", "float32", "int8")
PART = "part-rank000.arrow"
EVENT_SUFFIXES = (".csv", ".tsv", ".txt", ".parquet", ".pq")
#: appended users per batch. Each brings about one new window, so a batch of history-batch size is
#: tiny tensor ops whose per-call overhead dominated (10,000 users: 64 per batch 40 s, 4096 per
#: batch 7 s); a batch holds its users' cache and every block's keys and values projected from it
#: in memory (the synthetic stage 1's keys and values are ~0.38 MB a user), so 1024 bounds it near
#: 0.4 GB plus padding
APPEND_BATCH = 1024
#: share of stored codes the first encoding may fail to reproduce (float rounding at near-ties)
REPRODUCE_TOLERANCE = 0.01
NO_TIME = np.iinfo(np.int64).min


# ------------------------------------------------------------------------------ identity
def weights_digest(*modules: torch.nn.Module | None) -> str:
    """blake2b-128 over the named tensors of ``modules`` (in order): which weights made a dataset."""
    h = hashlib.blake2b(digest_size=16)
    for k, mod in enumerate(modules):
        if mod is None:
            continue
        for name, t in sorted(mod.state_dict().items()):
            h.update(f"{k}.{name}:{tuple(t.shape)}:{t.dtype}".encode())
            h.update(t.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


# ------------------------------------------------------------------------------ arrow helpers
def _write_ipc(table: pa.Table, path: Path) -> None:
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_file(sink, table.schema) as writer:
        writer.write_table(table)


def _read_ipc(path: Path) -> pa.Table:
    try:
        return pa.ipc.open_file(pa.memory_map(str(path), "r")).read_all()
    except (OSError, pa.ArrowInvalid) as err:
        raise DataError(f"{path}: the append cache is unreadable ({err}); append to an earlier version, or to "
                        f"the tokenizer's own output (the cache is then rebuilt).") from err


def _ragged(values: list[np.ndarray], typ: pa.DataType) -> pa.Array:
    offsets = np.concatenate([[0], np.cumsum([len(v) for v in values])]).astype(np.int64)
    flat = np.concatenate(values) if values else np.zeros(0)
    return pa.LargeListArray.from_arrays(pa.array(offsets), pa.array(flat, typ))


class KVParts:
    """The kv parts of an append cache, memory-mapped and read without copies: each user's cache
    is its rows of every part, concatenated along the row axis in part order."""

    def __init__(self, folder: Path, names: list[str], self_layers: int, dim: int):
        self.self_layers, self.dim = self_layers, dim
        self.paths = [folder / name for name in names]
        self.parts = []
        self.dtype = np.float32
        for name in names:
            batches = [b for b in _read_ipc(folder / name).to_batches() if b.num_rows]
            ids = [b.column("user_id").to_numpy() for b in batches]
            where = (np.repeat(np.arange(len(batches)), [len(i) for i in ids]),
                     np.concatenate([np.arange(len(i)) for i in ids]) if ids else np.zeros(0, np.int64))
            cols = [[(b.column(c).offsets.to_numpy(), b.column(c).values.to_numpy(zero_copy_only=True),
                      b.column(f"{c}_scale").values.to_numpy(zero_copy_only=True)
                      if f"{c}_scale" in b.schema.names else None)
                     for b in batches] for c in ("self_h", "mem")]
            if batches:
                self.dtype = cols[0][0][1].dtype
            row_len = [np.concatenate([np.asarray(b.column(c)) for b in batches]).astype(np.int64) if batches else
                       np.zeros(0, np.int64) for c in ("self_len", "mem_len")]  # per row of the part: cached rows
            self.parts.append((pd.Index(np.concatenate(ids) if ids else np.zeros(0, np.int64)), where, cols, row_len))

    def cache(self, uids: np.ndarray, n_windows: np.ndarray) -> QFormerCache:
        """The padded batch cache of users ``uids`` (each user's rows of every part, in part order,
        real rows first), copied once from the memory-mapped parts, in the stored float dtype (an
        int8 cache is read back as float32, each row times its scale)."""
        b, dim = len(uids), self.dim
        layers = (self.self_layers, 1)  # self_h: blocks 1..L-1; mem: one set for every block
        found = [index.get_indexer(uids) for index, _, _, _ in self.parts]
        lens = np.stack([np.stack([np.where(r >= 0, row_len[c][r], 0) for c in (0, 1)])
                         for r, (_, _, _, row_len) in zip(found, self.parts, strict=True)]) if self.parts else \
            np.zeros((0, 2, b), np.int64)  # part, kind, user: rows held
        total = lens.sum(0)  # kind, user
        dtype = np.float32 if self.dtype == np.int8 else self.dtype
        bufs = [np.zeros((b, layers[c], int(total[c].max()) if b else 0, dim), dtype) for c in (0, 1)]
        filled = np.zeros((2, b), np.int64)
        for p, (r, (_, (batch_of, row_of), cols, _)) in enumerate(zip(found, self.parts, strict=True)):
            for j in np.flatnonzero(r >= 0):
                bi, i = batch_of[r[j]], row_of[r[j]]
                for c in (0, 1):
                    n = lens[p, c, j]
                    if n and layers[c]:
                        off, flat, scale = cols[c][bi]
                        at = filled[c, j]
                        got = flat[off[i]:off[i + 1]].reshape(layers[c], n, dim)
                        if scale is not None:
                            got = got.astype(np.float32) * scale[off[i] // dim:off[i + 1] // dim].astype(
                                np.float32).reshape(layers[c], n, 1)
                        bufs[c][j, :, at:at + n] = got
                    filled[c, j] += n
        from data_modules.datamodule import release_pages

        release_pages(self.paths)  # the pages just copied from: a pass over every user would hold the whole cache
        return QFormerCache(torch.from_numpy(bufs[0]), torch.from_numpy(total[0]), torch.from_numpy(bufs[1]),
                            torch.from_numpy(total[1]), torch.as_tensor(np.asarray(n_windows, np.int64)))


def _real_rows(rows: torch.Tensor, lens: torch.Tensor, dtype: np.dtype) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """(flat values in ``dtype``, per-user element counts, the int8 rows' scales or None) of the
    first ``lens[b]`` rows of each user of ``rows`` [B, L, T, C], user-major then layer then row
    (the kv part's layout), in one gather. int8: each row of C values is stored as round(x / s)
    with its own scale s = max|x| / 127 (float16): a quarter of float32's bytes."""
    b, n_layers, t, c = rows.shape
    keep = (torch.arange(t)[None, :] < lens[:, None])[:, None, :].expand(b, n_layers, t)
    real = rows[keep].float()  # [rows, C]
    counts = lens.numpy().astype(np.int64) * n_layers * c
    if np.dtype(dtype) != np.int8:
        return real.numpy().astype(dtype, copy=False).reshape(-1), counts, None
    scale = (real.abs().amax(1) / 127).to(torch.float16)  # as stored: quantise with that very value
    q = torch.round(real / scale.float().clamp_min(1e-30)[:, None]).clamp(-127, 127).to(torch.int8)
    return q.numpy().reshape(-1), counts, scale.numpy()


def _kv_batch(user_ids: np.ndarray, cache: QFormerCache, dtype: np.dtype) -> pa.RecordBatch:
    """The rows of a :class:`~foundv2.nn.qformer.QFormerCache` (a first encoding's, or the delta
    an append adds), one record batch of ``user_id, self_len, mem_len, self_h, mem`` (and, for an
    int8 cache, ``self_h_scale, mem_scale``: one float16 per stored row)."""
    cols = {"user_id": pa.array(user_ids, pa.int64()),
            "self_len": pa.array(cache.self_len.numpy(), pa.int32()),
            "mem_len": pa.array(cache.mem_len.numpy(), pa.int32())}
    for name, rows, lens in (("self_h", cache.self_h, cache.self_len), ("mem", cache.mem, cache.mem_len)):
        flat, counts, scale = _real_rows(rows, lens, dtype)
        offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        cols[name] = pa.LargeListArray.from_arrays(pa.array(offsets), pa.array(flat))
        if scale is not None:
            cols[f"{name}_scale"] = pa.LargeListArray.from_arrays(pa.array(offsets // rows.shape[-1]),
                                                                  pa.array(scale))
    return pa.RecordBatch.from_pydict(cols)


class _KVWriter:
    """Streams kv rows into one part file, batch by batch (the first encoding's part is large)."""

    def __init__(self, path: Path, dtype: np.dtype):
        self.path, self.dtype, self.sink, self.writer = path, np.dtype(dtype), None, None

    def write_batch(self, batch: pa.RecordBatch) -> None:
        if self.writer is None:
            self.sink = pa.OSFile(str(self.path), "wb")
            self.writer = pa.ipc.new_file(self.sink, batch.schema)
        self.writer.write_batch(batch)

    def close(self) -> None:
        if self.writer is None:
            value = pa.from_numpy_dtype(self.dtype)
            scales = [(f"{c}_scale", pa.large_list(pa.float16())) for c in ("self_h", "mem")] \
                if self.dtype == np.int8 else []
            schema = pa.schema([("user_id", pa.int64()), ("self_len", pa.int32()), ("mem_len", pa.int32()),
                                ("self_h", pa.large_list(value)), ("mem", pa.large_list(value)), *scales])
            self.write_batch(pa.RecordBatch.from_pylist([], schema=schema))
        self.writer.close()
        self.sink.close()


def _link_or_copy(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


# ------------------------------------------------------------------------------ the models
class Models:
    """Stage 1 (a QFormerStage checkpoint, qformer backbone) and the tokenizer, checked against
    the tokens dataset and the data."""

    def __init__(self, qformer_ckpt: str, tokenizer_dir: str, tokens_meta: dict, dims: dict):
        from foundv2.nn.mrqvae import MultiViewRQVAE
        from foundv2.stages.qformer import QFormerStage

        if not Path(qformer_ckpt).is_file():
            raise DataError(f"--qformer {qformer_ckpt}: no such checkpoint file; give the stage-1 (QFormerStage) "
                            f"checkpoint whose features the tokenizer read.")
        try:
            stage = QFormerStage.load_from_checkpoint(qformer_ckpt, map_location="cpu")
        except DataError:
            raise
        except Exception as err:
            raise DataError(f"--qformer {qformer_ckpt}: not a loadable stage-1 checkpoint ({type(err).__name__}: "
                            f"{err}).") from err
        if stage.qformer is None:
            raise DataError(f"--qformer {qformer_ckpt}: a {stage.hparams.backbone!r} stage 1, which has no causal "
                            f"Q-Former to append with; append needs the qformer backbone.")
        differ = sorted(k for k in ("sources", "num_items", "num_categories", "text_dim", "tabular_dim", "max_windows")
                        if stage.dims.get(k) != dims.get(k))
        if differ:
            raise DataError(f"--qformer {qformer_ckpt}: the checkpoint was built for other data ("
                            + "; ".join(f"{k} {stage.dims.get(k)!r} there, {dims.get(k)!r} here" for k in differ)
                            + "); give the data config the dataset was made from.")
        if not (Path(tokenizer_dir) / "config.json").exists():
            raise DataError(f"--tokenizer {tokenizer_dir}: not a tokenizer folder (no config.json); pass the "
                            f"tokenizer fit's export_dir.")
        try:
            tokenizer = MultiViewRQVAE.from_pretrained(tokenizer_dir)
        except DataError:  # a damaged export: its message names the file and the fix
            raise
        except Exception as err:
            raise DataError(f"--tokenizer {tokenizer_dir}: cannot be loaded ({type(err).__name__}: {err}).") from err
        theirs = {"sources": list(tokenizer.sources), "vocab_size": int(tokenizer.vocab_size),
                  "levels": int(tokenizer.quantizer.n_levels)}
        ours = {k: tokens_meta.get(k) for k in theirs}
        if theirs != ours:
            raise DataError(f"--tokenizer {tokenizer_dir}: a tokenizer other than the one that made the tokens "
                            f"dataset ({theirs} there, {ours} in the dataset); give the tokenizer that made it.")
        if tokens_meta.get("feature_dim") not in (None, stage.feature_dim):
            raise DataError(f"--qformer {qformer_ckpt}: its slice features are {stage.feature_dim} wide but the tokenizer "
                            f"read {tokens_meta['feature_dim']}-wide features; give the stage 1 that fed it.")
        for m in (stage, tokenizer):
            m.eval()
        self.stage, self.tokenizer = stage, tokenizer
        self.num_sources = len(stage.dims["sources"])
        self.identity = {"qformer": weights_digest(stage.encoder, stage.tabular, stage.qformer),
                         "tokenizer": weights_digest(tokenizer)}
        self.self_layers = len(stage.qformer.blocks) - 1  # the cache keeps blocks 1.. (QFormerCache)
        self.dim = int(stage.qformer.dim)

    @torch.no_grad()
    def tokens(self, feat: torch.Tensor, source: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(codes [N, L], global token ids [N, L]) of slice features, as the tokenizer's predict."""
        codes = self.tokenizer.tokenize(feat.float(), source)
        return codes, self.tokenizer.global_ids(codes, source)


# ------------------------------------------------------------------------------ the tokens dataset
class TokenRows:
    """A tokens dataset's per-user arrays (the columns the tokenizer's predict writes)."""

    SLICE_COLS = (("slice_window", np.int32), ("slice_source", np.int8), ("slice_key", np.int64),
                  ("codes", np.int32), ("token_ids", np.int64))

    def __init__(self, folder: str):
        ds, meta = read_stage_output(folder)
        if meta.get("kind") != "tokens":
            raise DataError(f"--tokens {folder}: a {meta.get('kind')!r} dataset, not a tokens one; give the "
                            f"tokenizer's predict output (or an earlier append's).")
        table = ds.data.table if hasattr(ds.data, "table") else ds.data
        missing = [c for c in ("user_id", "row", "split", *[c for c, _ in self.SLICE_COLS]) if c not in table.column_names]
        if missing:
            raise DataError(f"--tokens {folder}: the dataset lacks the column(s) {missing}; tokenize it again.")
        self.folder, self.meta = Path(folder), meta
        self.levels = int(meta["levels"])
        self.user_id = np.asarray(table.column("user_id"), np.int64)
        self.row = np.asarray(table.column("row"), np.int64)
        self.split = np.asarray(table.column("split"), np.int8)
        if len(np.unique(self.user_id)) != len(self.user_id):
            raise DataError(f"--tokens {folder}: a user appears twice; the dataset is not one tokenizer predict.")
        self.flat: dict[str, np.ndarray] = {}
        self.cols: dict[str, list[np.ndarray]] = {}  # per user: views into flat
        for name, dtype in self.SLICE_COLS:
            arr = table.column(name).combine_chunks()
            off, child = arr.offsets.to_numpy().astype(np.int64), arr.values
            if isinstance(child, pa.FixedSizeListArray):  # codes, token_ids: [n, L] per user
                flat = child.flatten().to_numpy(zero_copy_only=False).reshape(-1, child.type.list_size)
            else:
                flat = child.to_numpy(zero_copy_only=False)
            flat = flat[off[0]:off[-1]].astype(dtype, copy=False)
            self.off = off - off[0]  # the same for every slice column: one entry per slice
            self.flat[name] = flat
            self.cols[name] = [flat[self.off[i]:self.off[i + 1]] for i in range(len(off) - 1)]
        self.index = pd.Index(self.user_id)
        self.added: list[tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]] = []

    def extend(self, users: np.ndarray, counts: np.ndarray, slices: dict[str, np.ndarray]) -> None:
        """Queue new slices after the old ones of users ``users`` (dataset rows, each at most
        once over all calls): ``counts[j]`` slices of ``slices[name]`` (user by user) each."""
        self.added.append((np.asarray(users, np.int64), np.asarray(counts, np.int64),
                           {name: np.asarray(slices[name]).astype(dtype, copy=False) for name, dtype in self.SLICE_COLS}))

    def merged(self) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """(offsets, flat columns) with the queued slices placed after each user's old ones:
        one vectorised scatter per column, however many users were extended."""
        if not self.added:
            return self.off, self.flat
        users = np.concatenate([u for u, _, _ in self.added])
        counts = np.concatenate([c for _, c, _ in self.added])
        old_len = np.diff(self.off)
        add = np.zeros_like(old_len)
        add[users] = counts
        off = np.concatenate([[0], np.cumsum(old_len + add)])
        old_dest = np.repeat(off[:-1] - self.off[:-1], old_len) + np.arange(self.off[-1])
        first_new = np.concatenate([[0], np.cumsum(counts)[:-1]])
        new_dest = np.repeat(off[users] + old_len[users] - first_new, counts) + np.arange(int(counts.sum()))
        flat = {}
        for name, _ in self.SLICE_COLS:
            col = np.empty((int(off[-1]), *self.flat[name].shape[1:]), self.flat[name].dtype)
            col[old_dest] = self.flat[name]
            col[new_dest] = np.concatenate([a[name] for _, _, a in self.added])
            flat[name] = col
        return off, flat

    def table(self) -> pa.Table:
        out = {"user_id": pa.array(self.user_id, pa.int64()), "row": pa.array(self.row, pa.int64()),
               "split": pa.array(self.split, pa.int8())}
        off, cols = self.merged()
        offsets = pa.array(off.astype(np.int32))
        for name, _ in self.SLICE_COLS:
            flat = cols[name]
            if flat.ndim == 2:
                inner = pa.FixedSizeListArray.from_arrays(pa.array(flat.reshape(-1)), flat.shape[1])
            else:
                inner = pa.array(flat)
            out[name] = pa.ListArray.from_arrays(offsets, inner)
        return pa.table(out)


# ------------------------------------------------------------------------------ new events
def read_events(path: str, spec, timestamp_unit: str) -> pd.DataFrame:
    """The new events of ``path`` (a file, or a folder of CSV/TSV/Parquet files), validated
    against the data set's sources, sorted by (user, time) with file order breaking ties."""
    from data_modules.sources.files import read_table

    p = Path(path)
    files = sorted(f for f in p.iterdir() if f.suffix.lower() in EVENT_SUFFIXES) if p.is_dir() else [p]
    if not files:
        raise DataError(f"--events {p}: the folder holds no .csv, .tsv or .parquet file.")
    frames = [validate_events(read_table(f), spec.sources, str(f), timestamp_unit) for f in files]
    ev = pd.concat(frames, ignore_index=True) if len(frames) > 1 else frames[0]
    order = np.lexsort((np.arange(len(ev)), ev["timestamp"].to_numpy(), ev["user_id"].to_numpy()))
    return ev.iloc[order].reset_index(drop=True)


class NewWindows:
    """The new events grouped per user into new windows, in the prepared data's encoding: checked
    (known users, later than each user's last window, room in the window table), windowed, encoded
    and laid out per user as the prepared table holds its history."""

    def __init__(self, ev: pd.DataFrame, dm, where: str, rows: TokenRows, last_key: np.ndarray,
                 last_time: np.ndarray, first_day: np.ndarray, n_windows: np.ndarray, max_windows: int):
        uid = ev["user_id"].to_numpy()
        ts = ev["timestamp"].to_numpy()
        pos = self._known_rows(uid, rows, where)
        ustart = np.ones(len(uid), bool)
        ustart[1:] = uid[1:] != uid[:-1]
        key = window_keys(ustart, ts, dm.window, last_key[pos] + 1)  # the prepared data's windows, numbered on
        self._check_later(uid, ts, key, pos, last_key, last_time, dm.window.mode, where)
        rel, kstart = window_ordinals(ustart, key)
        self.users = pos[ustart]  # token-dataset row of each appended user
        self.new_counts = np.bincount(np.cumsum(ustart) - 1, weights=kstart).astype(np.int64)
        self._check_room(n_windows, max_windows, rows, where)
        src, item, cat, text, uniq = self._encode(ev, dm)
        self.text_emb = self._embed(dm, [str(t) for t in uniq], dm.meta)
        self._lay_out(ustart, ts, rel, kstart, key, src, item, text, cat, ev["value"].to_numpy().astype(np.float32),
                      last_time)
        self.n_events = len(ev)
        # the user's first history day (the calendar's tenure): kept, or the first new day without history
        self.first_day = np.where(first_day[self.users] >= 0, first_day[self.users], ts[ustart] // SECONDS_PER_DAY)
        self.last_time = ts[np.append(ustart[1:], True)]
        self.last_key = key[np.append(ustart[1:], True)]

    @staticmethod
    def _known_rows(uid: np.ndarray, rows: TokenRows, where: str) -> np.ndarray:
        """Each event's user's row in the tokens dataset; a user it does not hold is refused."""
        known = np.isin(uid, rows.user_id)
        if not known.all():
            bad = sorted(set(uid[~known].tolist()))
            raise DataError(f"{where}: {int((~known).sum())} event row(s) belong to {len(bad)} user(s) the tokens "
                            f"dataset {rows.folder} does not hold, e.g. {bad[:5]}; append adds windows to existing "
                            f"users only (tokenize new users with `foundv2 tokenize`).")
        return rows.index.get_indexer(uid).astype(np.int64)

    @staticmethod
    def _check_later(uid, ts, key, pos, last_key, last_time, mode: str, where: str) -> None:
        """Every new event comes after its user's last tokenized window (a window is final)."""
        if mode == "events":
            late = ts > last_time[pos]
            what = "an event time after the user's last event"
        else:
            late = key > last_key[pos]
            what = f"a {mode} after the user's last window"
        if not late.all():
            i = int(np.flatnonzero(~late)[0])
            raise DataError(f"{where}: {int((~late).sum())} event row(s) are not later than their user's last "
                            f"tokenized window, e.g. user {int(uid[i])} at timestamp {int(ts[i])} (window key "
                            f"{int(key[i])}, the user's last window key {int(last_key[pos[i]])}). A window is "
                            f"final once tokenized: every appended event needs {what}.")

    def _check_room(self, n_windows: np.ndarray, max_windows: int, rows: TokenRows, where: str) -> None:
        """After the append every user's windows still fit the Q-Former's window table."""
        over = n_windows[self.users] + self.new_counts > max_windows
        if over.any():
            i = int(np.flatnonzero(over)[0])
            raise DataError(f"{where}: after the append, {int(over.sum())} user(s) would have more windows than the "
                            f"stage-1 Q-Former's window table (max_windows {max_windows}), e.g. user "
                            f"{int(rows.user_id[self.users[i]])} with {int(n_windows[self.users[i]])} + "
                            f"{int(self.new_counts[i])}; a causal append cannot shift the earlier windows' positions. "
                            f"Re-tokenize those users' latest windows with `foundv2 tokenize` instead.")

    def _encode(self, ev: pd.DataFrame, dm) -> tuple[np.ndarray, ...]:
        """The prepared data's encodings of the events: source index, global item index (0: an
        item it never saw), category (-1: none or unknown), text (index into the distinct new
        texts, -1: none), and those texts."""
        from data_modules.prepare import ITEM_KEY_STRIDE

        spec = dm.spec
        src_index = {s: i for i, s in enumerate(spec.sources)}
        src = ev["source"].map(src_index).to_numpy().astype(np.int64)
        items = pa.ipc.open_stream(pa.memory_map(str(dm.prepared_dir / "items.arrow"))).read_all()
        item_keys = np.asarray(items.column("source"), np.int64) * ITEM_KEY_STRIDE + np.asarray(items.column("item_id"),
                                                                                              np.int64)
        raw = ev["item_id"].to_numpy()
        has_item = raw >= 0
        found = pd.Index(item_keys).get_indexer(src * ITEM_KEY_STRIDE + raw)
        item = np.where(has_item & (found >= 0), found + 1, 0).astype(np.int64)
        self.unknown_items = int((has_item & (found < 0)).sum())
        cat = codes_of(ev["category"], spec.categories)  # as preparation encodes them
        self.unknown_categories = int(((cat < 0) & (ev["category"].to_numpy(dtype=object) != "")).sum())
        for n, what in ((self.unknown_items, "items the prepared data never saw (kept as no item)"),
                        (self.unknown_categories, "categories outside the vocabulary (kept as no category)")):
            if n:
                log.warning("append: %d new event(s) have %s", n, what)
        texts = ev["text"].to_numpy(dtype=object)
        has_text = texts != ""
        uniq, text_local = np.unique(texts[has_text].astype(str), return_inverse=True) if has_text.any() else \
            (np.zeros(0, object), np.zeros(0, np.int64))
        text = np.full(len(ev), -1, np.int64)
        text[has_text] = text_local
        return src, item, cat, text, uniq

    def _lay_out(self, ustart, ts, rel, kstart, key, src, item, text, cat, value, last_time) -> None:
        """Per-user columns as the prepared table holds them (``h_window``: the new window, 0 = the
        first new one), each user's events after a lead event at its last old event's time, which
        sets the first new event's gap (the event encoder's time feature) and is dropped after
        encoding (no history: masked, -1); and the new windows' keys and days."""
        group = np.cumsum(ustart) - 1
        n_users = len(self.users)
        prev = last_time[self.users]
        has_prev = prev != NO_TIME
        lead = np.flatnonzero(ustart) + np.arange(n_users)  # where each user's lead event goes
        at = np.arange(len(ts)) + group + 1  # where each new event goes

        def with_lead(values: np.ndarray, lead_value, dtype) -> np.ndarray:
            out = np.empty(len(ts) + n_users, dtype)
            out[lead], out[at] = lead_value, values
            return out

        flat = {"h_source": with_lead(src, np.where(has_prev, 0, -1), np.int64),
                "h_item": with_lead(item, 0, np.int64), "h_text": with_lead(text, -1, np.int64),
                "h_value": with_lead(value, 0.0, np.float32),
                "h_time": with_lead(ts, np.where(has_prev, prev, ts[ustart]), np.int64),
                "h_category": with_lead(cat, -1, np.int64), "h_window": with_lead(rel, 0, np.int64)}
        cuts = lead[1:]
        self.cols = {name: np.split(v, cuts) for name, v in flat.items()}
        wcuts = np.cumsum(self.new_counts)[:-1]
        self.cols["w_key"] = np.split(key[kstart], wcuts)
        self.cols["w_day"] = np.split((ts // SECONDS_PER_DAY)[kstart], wcuts)

    @staticmethod
    def _embed(dm, texts: list[str], meta: dict) -> np.ndarray:
        """Embeddings of the new events' texts: the data's text encoder through the shared text
        cache (a text the prepared data saw is a cache hit), fp16 as prepared data stores them."""
        d = int(meta["text_dim"])
        if not texts:
            return np.zeros((0, d), np.float32)
        from data_modules.text import TextCache, build_text_encoder

        cache = TextCache(Path(dm.hparams.cache_dir) / "text", build_text_encoder(dm.hparams.text_encoder))
        emb = np.asarray(cache.embed(texts, progress=False), np.float16)
        if emb.shape[1] != d:
            raise DataError(f"the text encoder {dm.hparams.text_encoder!r} gives {emb.shape[1]}-d embeddings but the "
                            f"prepared data has {d}-d ones; give the data config the dataset was made from.")
        return emb.astype(np.float32)

    def batch(self, idx: np.ndarray, tokens: TokenRows, collate) -> dict:
        """The event batch of appended users ``idx`` (positions in :attr:`users`)."""
        cols = {name: [self.cols[name][i] for i in idx] for name in self.cols}
        rows = self.users[idx]
        cols.update(user_id=tokens.user_id[rows].tolist(), row=tokens.row[rows].tolist(),
                    split=tokens.split[rows].tolist(), n_windows=self.new_counts[idx].tolist(),
                    first_day=self.first_day[idx].tolist(),
                    f_item=[np.zeros(0, np.int64)] * len(idx), fut_text=[-1] * len(idx))
        return collate(cols)


# ------------------------------------------------------------------------------ the cache
class AppendCache:
    """The append cache beside a tokens dataset version (see the module docstring)."""

    def __init__(self, folder: Path, models: Models, n_users_rows: TokenRows):
        meta = json.loads((folder / CACHE_META).read_text())
        if meta.get("format") != CACHE_FORMAT:
            raise DataError(f"{folder}: an append cache of format {meta.get('format')}, this foundv2 reads "
                            f"{CACHE_FORMAT}; append to the tokenizer's own output to rebuild it.")
        for what, flag in (("qformer", "--qformer"), ("tokenizer", "--tokenizer")):
            if meta["identity"].get(what) != models.identity[what]:
                raise DataError(f"{flag}: the {what} given is not the one that made {folder.parent} (its weights' "
                                f"digest {models.identity[what]} differs from the dataset's "
                                f"{meta['identity'].get(what)}); give the checkpoint and tokenizer that made it.")
        users = _read_ipc(folder / CACHE_USERS)
        if not np.array_equal(np.asarray(users.column("user_id")), n_users_rows.user_id):
            raise DataError(f"{folder}: the append cache's users differ from the tokens dataset's; the folder was "
                            f"edited. Append to the tokenizer's own output to rebuild the cache.")
        self.folder, self.meta = folder, meta
        self.n_windows = np.asarray(users.column("n_windows"), np.int64)
        self.last_key = np.asarray(users.column("last_key"), np.int64)
        self.last_time = np.asarray(users.column("last_time"), np.int64)
        self.first_day = np.asarray(users.column("first_day"), np.int64)
        self.parts = list(meta["parts"])
        self.kv = KVParts(folder, self.parts, models.self_layers, models.dim)
        self.dtype = np.dtype(meta.get("dtype", "float32"))


def users_table(user_id, n_windows, last_key, last_time, first_day) -> pa.Table:
    return pa.table({"user_id": pa.array(user_id, pa.int64()), "n_windows": pa.array(n_windows, pa.int64()),
                     "last_key": pa.array(last_key, pa.int64()), "last_time": pa.array(last_time, pa.int64()),
                     "first_day": pa.array(first_day, pa.int64())})


def prepared_state(dm, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Per prepared row: the windows a batch keeps (``min(n_windows, max_windows)``), the last
    window's key, the last history event's time (:data:`NO_TIME` without history) and the first
    history day (-1 without history; the calendar features' tenure counts from it)."""
    table = dm.table.data.table if hasattr(dm.table.data, "table") else dm.table.data
    n = np.minimum(np.asarray(table.column("n_windows"), np.int64)[rows], int(dm.hparams.max_windows))
    first_day = np.asarray(table.column("first_day"), np.int64)[rows]
    out = []
    for name in ("w_key", "h_time"):
        arr = table.column(name).combine_chunks()
        off, flat = arr.offsets.to_numpy(), arr.values.to_numpy(zero_copy_only=False).astype(np.int64)
        has = off[rows + 1] > off[rows]
        out.append(np.where(has, flat[np.maximum(off[rows + 1] - 1, 0)], -1 if name == "w_key" else NO_TIME))
    return n, out[0], out[1], first_day


@torch.no_grad()
def encode_history(dm, rows: TokenRows, models: Models, batch_size: int, kv_path: Path, dtype: np.dtype) -> dict:
    """The first encoding: stage 1 over every user's prepared history (the data module's batches,
    as its predict saw them) with the cache kept, the codes checked against the stored ones.
    Writes the kv part ``kv_path`` (in ``dtype``); returns each user's window count, last key and
    last event time."""
    from data_modules.datamodule import BATCH_KINDS, UserRows
    from foundv2.stages.base import with_window_keys

    stage, S = models.stage, models.num_sources
    collate = BATCH_KINDS["events"].collate(dm)  # the batches stage 1's predict saw
    table = UserRows(dm.table, rows.row)
    n = len(rows.user_id)
    writer = _KVWriter(kv_path, dtype)
    n_windows, last_key = np.zeros(n, np.int64), np.full(n, -1, np.int64)
    last_time = np.full(n, NO_TIME, np.int64)
    checked = differ = 0
    # users of like length share a batch, as in predict_order: length (the cache is looked up by
    # user id, so the order is free); on 10,000 synthetic users the pass took the same time either way
    order = np.argsort(dm.row_lengths(rows.row), kind="stable")
    for start in range(0, n, batch_size):
        idx = order[start:start + batch_size].tolist()
        batch = collate(table.__getitems__(idx))
        events = stage.encoder(batch)
        profile = stage.tabular(batch["tabular"])
        out, cache = stage.qformer.forward_window(events, batch["ev_window"], batch["ev_source"], batch["ev_mask"],
                                                  batch["win_mask"], context=None if profile is None else profile[:, None])
        sl = with_window_keys(stage.flat_views(batch, out.views, out.present, profile), batch, S)
        codes, _ = models.tokens(sl["feat"], sl["slice_source"])
        counts = torch.bincount(sl["slice_user"], minlength=len(idx)).tolist()
        per_user = [torch.split(sl[k], counts) for k in ("slice_window", "slice_source", "slice_key")]
        per_codes = torch.split(codes, counts)
        for j, i in enumerate(idx):
            same = all(np.array_equal(per_user[c][j].numpy(), rows.cols[name][i])
                       for c, name in enumerate(("slice_window", "slice_source", "slice_key")))
            if not same:
                raise DataError(f"--tokens {rows.folder}: user {int(rows.user_id[i])}'s windows there differ from "
                                f"what the data config's history gives (the slices {rows.cols['slice_key'][i][:8]} "
                                f"vs {per_user[2][j].numpy()[:8]}); give the data config the dataset was made from.")
            checked += len(rows.cols["codes"][i])
            differ += int((per_codes[j].numpy() != rows.cols["codes"][i]).any(1).sum())
        writer.write_batch(_kv_batch(rows.user_id[idx], cache, dtype))
        for j, nw in enumerate(cache.n_windows.tolist()):
            i = idx[j]
            n_windows[i] = nw
            wm = batch["win_mask"][j]
            if nw:
                last_key[i] = int(batch["win_key"][j][wm][-1])
            em = batch["ev_mask"][j]
            if em.any():
                last_time[i] = int(batch["ev_time"][j][em].max())
    writer.close()
    share = differ / max(checked, 1)
    if share > REPRODUCE_TOLERANCE:
        raise DataError(f"--qformer/--tokenizer: re-encoding the history reproduces only {1 - share:.1%} of the "
                        f"{checked:,} stored slices' codes of {rows.folder}: the stage-1 checkpoint or the tokenizer "
                        f"(or the data config) is not the one that made the dataset. Give the ones that made it.")
    if differ:
        log.warning("append: %d of %d stored slices' codes were not reproduced bit for bit (float rounding at "
                    "near-ties); the stored codes are kept", differ, checked)
    return {"n_windows": n_windows, "last_key": last_key,
            "last_time": last_time, "checked": checked, "not_reproduced": differ}


@torch.no_grad()
def append_windows(new: NewWindows, rows: TokenRows, models: Models, kv: KVParts, n_windows: np.ndarray,
                   dm, batch_size: int, kv_path: Path, dtype: np.dtype) -> dict:
    """Encode the new windows of the appended users from their caches; queue their new token
    rows (:meth:`TokenRows.extend`) and stream what they add to the cache into the kv part
    ``kv_path`` (users in batch order). Returns counts and timings."""
    from data_modules.datamodule import EventCollate

    stage = models.stage
    collate = EventCollate(dm.meta, new.text_emb, int(stage.qformer.max_windows), max_events=2**31 - 1)
    m = len(new.users)
    t = {"read_cache_s": 0.0, "encode_s": 0.0, "tokenize_s": 0.0, "write_cache_s": 0.0}
    added = 0
    writer = _KVWriter(kv_path, dtype)
    # users of like history length batched together: the cache is padded to a batch's longest
    order = np.argsort(n_windows[new.users], kind="stable")
    for start in range(0, m, batch_size):
        idx = order[start:start + batch_size]
        t0 = time.perf_counter()
        batch = new.batch(idx, rows, collate)
        users = new.users[idx]
        cache = kv.cache(rows.user_id[users], n_windows[users])
        t1 = time.perf_counter()
        events = stage.encoder(batch)[:, 1:]  # the lead event only set the first new event's gap
        out, delta = stage.qformer.forward_window(events, batch["ev_window"][:, 1:], batch["ev_source"][:, 1:],
                                                  batch["ev_mask"][:, 1:], batch["win_mask"], cache, delta=True)
        t2 = time.perf_counter()
        sl = stage.flat_views(batch, out.views, out.present, None, lead=1)  # the lead event is in no new window
        codes, gids = models.tokens(sl["feat"], sl["slice_source"])
        counts = torch.bincount(sl["slice_user"], minlength=len(idx)).numpy()
        # flat_slices orders slices user by user: the new rows are already grouped as extend wants
        rows.extend(users, counts, {
            "slice_window": (sl["slice_window"] + cache.n_windows[sl["slice_user"]]).numpy(),
            "slice_source": sl["slice_source"].numpy(),
            "slice_key": batch["win_key"][sl["slice_user"], sl["slice_window"]].numpy(),
            "codes": codes.numpy(), "token_ids": gids.numpy()})
        added += int(counts.sum())
        t3 = time.perf_counter()
        writer.write_batch(_kv_batch(rows.user_id[users], delta, dtype))
        t4 = time.perf_counter()
        t["read_cache_s"] += t1 - t0
        t["encode_s"] += t2 - t1
        t["tokenize_s"] += t3 - t2
        t["write_cache_s"] += t4 - t3
    writer.close()
    return {"slices_added": added, **t}


# ------------------------------------------------------------------------------ the command
def append_tokens(dm, tokens: str, output: str, qformer: str, tokenizer: str, events: str | None = None,
                  batch_size: int | None = None, append_batch: int = APPEND_BATCH,
                  cache_dtype: str = "float16") -> dict:
    """Append the windows of ``events`` to the tokens dataset ``tokens``; write the new version
    ``output`` (see the module docstring). ``cache_dtype``: how a cache built by this call stores
    its numbers (:data:`CACHE_DTYPES`; an existing cache keeps its own). Returns the append report
    (also in ``meta.json``)."""
    t_start = time.perf_counter()
    out = Path(output)
    if out.resolve() == Path(tokens).resolve():
        raise DataError(f"--output {output}: the same folder as --tokens; an append writes a new version beside "
                        f"the old one (e.g. {Path(tokens).name}-v2), never over it.")
    from data_modules.store import check_output_folder, remove_dead_tmp

    check_output_folder(out, "append output (--output)", "point --output at a folder you can write, or fix its "
                        "permissions")
    remove_dead_tmp(out.parent, prefix=out.name)  # what a killed append left beside it
    dm.setup()
    rows = TokenRows(tokens)
    models = Models(qformer, tokenizer, rows.meta, dm.dims())
    batch_size = int(batch_size or dm.hparams.batch_size)
    cache_dir = Path(tokens) / CACHE_DIR
    cache = AppendCache(cache_dir, models, rows) if (cache_dir / CACHE_META).exists() else None
    if cache_dtype not in CACHE_DTYPES:
        raise DataError(f"--cache_dtype {cache_dtype!r}: one of {list(CACHE_DTYPES)}.")
    dtype = cache.dtype if cache is not None else np.dtype(cache_dtype)
    ev = read_events(events, dm.spec, str((dm.hparams.loader_args or {}).get("timestamp_unit", "s"))) \
        if events else None
    max_windows = int(models.stage.qformer.max_windows)
    if cache is None:  # what the first encoding will find, from the prepared history (checks before any work)
        n_windows, last_key, last_time, first_day = prepared_state(dm, rows.row)
    else:
        last_time, last_key, n_windows, first_day = cache.last_time, cache.last_key, cache.n_windows, cache.first_day
    new = NewWindows(ev, dm, str(events), rows, last_key, last_time, first_day, n_windows, max_windows) \
        if ev is not None \
        else None
    t_ready = time.perf_counter()
    report = {"from": str(tokens), "events": str(events) if events else None, "users": len(rows.user_id),
              "startup_s": t_ready - t_start}
    with atomic_dir(out) as tmp:
        (tmp / CACHE_DIR).mkdir()
        if cache is None:
            t0 = time.perf_counter()
            first = encode_history(dm, rows, models, batch_size, tmp / CACHE_DIR / "kv-00000.arrow", dtype)
            parts = ["kv-00000.arrow"]
            n_windows, last_key, last_time = first["n_windows"], first["last_key"], first["last_time"]
            kv = KVParts(tmp / CACHE_DIR, parts, models.self_layers, models.dim)
            report["first_encoding"] = {"seconds": time.perf_counter() - t0, "slices_checked": first["checked"],
                                        "not_reproduced": first["not_reproduced"]}
        else:
            parts = list(cache.parts)
            for name in parts:
                _link_or_copy(cache_dir / name, tmp / CACHE_DIR / name)
            kv = cache.kv
        n_windows, last_key, last_time, first_day = (a.copy() for a in (n_windows, last_key, last_time, first_day))
        if new is not None and len(new.users):
            t0 = time.perf_counter()
            name = f"kv-{len(parts):05d}.arrow"
            res = append_windows(new, rows, models, kv, n_windows, dm, int(append_batch), tmp / CACHE_DIR / name,
                                 dtype)
            parts.append(name)
            n_windows[new.users] += new.new_counts
            last_key[new.users] = new.last_key
            last_time[new.users] = new.last_time
            first_day[new.users] = new.first_day
            report.update(appended_users=int(len(new.users)), appended_windows=int(new.new_counts.sum()),
                          appended_events=int(new.n_events), slices_added=res["slices_added"],
                          unknown_items=new.unknown_items, unknown_categories=new.unknown_categories,
                          append_s=time.perf_counter() - t0,
                          **{k: v for k, v in res.items() if k.endswith("_s")})
        t0 = time.perf_counter()
        _write_ipc(users_table(rows.user_id, n_windows, last_key, last_time, first_day), tmp / CACHE_DIR / CACHE_USERS)
        atomic_write_json(tmp / CACHE_DIR / CACHE_META, {
            "format": CACHE_FORMAT, "identity": models.identity, "parts": parts,
            "self_layers": models.self_layers, "dim": models.dim, "dtype": dtype.name,
            "bytes": sum((tmp / CACHE_DIR / name).stat().st_size for name in parts)})
        part = rows.table()
        with pa.OSFile(str(tmp / PART), "wb") as sink, pa.ipc.new_stream(sink, part.schema) as w:
            w.write_table(part)
        history = list(rows.meta.get("append", {}).get("history", []))
        meta = {**rows.meta, "parts": [PART], "world_size": 1,
                "append": {"history": [*history, {k: v for k, v in report.items() if not k.endswith("_s")}]}}
        write_output_meta(tmp, meta)
        from foundv2.stages.tokenizer import write_token_report

        write_token_report(tmp, models.tokenizer, int(rows.meta.get("feature_dim") or models.stage.qformer_config.dim))
        report["write_s"] = time.perf_counter() - t0
    report["total_s"] = time.perf_counter() - t_start
    return report


def append_command(args: list[str]) -> int:
    """``foundv2 tokenize --append``: see :mod:`foundv2.append` (and ``--help``)."""
    from foundv2 import launch

    parser = launch.data_parser(
        "foundv2 tokenize --append",
        "Append new windows of existing users to a tokens dataset without re-encoding their past: writes a NEW "
        "tokens dataset version (--output) in which every earlier window's codes are bit-identical. --events is a "
        "CSV/TSV/Parquet file, or a folder of them, in the canonical events schema (user_id, source, timestamp; "
        "optional item_id, text, value, category), the same format as the files loader's events; every event must "
        "come after its user's last tokenized window (day/week: a later window key; events windows: a later "
        "timestamp), and its users must be in --tokens. Windows are cut as the data config says. The first append "
        "to a tokenizer's own output re-encodes the history once to build the cache kept in <output>/append_cache "
        "(and proves --qformer/--tokenizer made the dataset); later appends cost only the new windows. Without "
        "--events only that cache is built.")
    parser.add_argument("--tokens", required=True, help="the tokens dataset to append to (never changed)")
    parser.add_argument("--output", required=True, help="the new tokens dataset version (written aside, renamed)")
    parser.add_argument("--events", default=None, help="new events: a CSV/TSV/Parquet file or a folder of them")
    parser.add_argument("--qformer", required=True, help="the stage-1 (QFormerStage) checkpoint that made the features")
    parser.add_argument("--tokenizer", required=True, help="the tokenizer folder (save_pretrained) that made the tokens")
    parser.add_argument("--batch_size", type=int, default=None,
                        help="users per batch of the first encoding of the history (default: data.batch_size)")
    parser.add_argument("--cache_dtype", default="float16", choices=list(CACHE_DTYPES),
                        help="how a new append cache stores its numbers: float32 (appended codes equal a full "
                             "re-tokenize to float rounding), float16 (half the bytes) or int8 (a quarter, one float16 "
                             "scale per row); the smaller, the more near-ties an appended code may fall the other way")
    parser.add_argument("--append_batch", type=int, default=APPEND_BATCH,
                        help=f"appended users per batch (default {APPEND_BATCH}; users of like history length together)")
    cfg = parser.parse_args(args)
    dm = parser.instantiate_classes(cfg).data
    report = append_tokens(dm, cfg.tokens, cfg.output, cfg.qformer, cfg.tokenizer, cfg.events, cfg.batch_size,
                           cfg.append_batch, cfg.cache_dtype)
    print(json.dumps(report, indent=1))
    return 0
