"""TokenizerStage: stage 2, the multi-view RQ-VAE over (user, window, source) slice features.

Input: a features dataset (``data.features_dir``: stage-1 output, Arrow) or, when none is given,
the built-in pooled features computed on the fly from event batches. Output of ``predict``:
the tokens dataset (per user ``user_id, row, split``; per slice ``slice_window, slice_source,
slice_key`` — the window key the prepared data assigned, carried over from the features — and
``codes, token_ids``; one Arrow part per rank) plus
``report.json`` with collisions and storage (bits per code, bytes per user, ratio to fp32/fp16).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pyarrow as pa

from data_modules.schema import DataError
from data_modules.store import atomic_write_json, read_output_meta
from foundv2.metrics.collisions import CollisionRate
from foundv2.nn.mrqvae import MultiViewRQVAE, RQVAEConfig
from foundv2.nn.quantizer import QuantizerConfig
from foundv2.nn.slices import PooledSliceFeatures
from foundv2.stages.base import OptimConfig, PredictStage, split_by_user, with_window_keys

POOLED_DIMS = ("num_sources", "num_items", "num_categories", "text_dim", "tabular_dim", "calendar_dim")


def storage_report(model: MultiViewRQVAE, n_slices_per_user: float, n_windows_per_user: float,
                   feature_dim: int) -> dict:
    """Bits per code per level (ceil(log2 of the table a source picks from)), bytes per user."""
    q = model.quantizer
    bits = []
    for lv in q.levels:
        sizes = [lv.block(b)[1] - lv.block(b)[0] for b in lv.blocks()]
        # union: a source picks from the shared block or its own; sequential: one codebook per level
        choices = sizes[0] + max(sizes[1:], default=0) if q.layout == "union" else max(sizes)
        bits.append(math.ceil(math.log2(max(choices, 2))))
    bits_per_slice = sum(bits)
    bytes_per_user = n_slices_per_user * bits_per_slice / 8
    fp32 = n_slices_per_user * feature_dim * 4
    return {
        "bits_per_code": bits,
        "bits_per_slice": bits_per_slice,
        "slices_per_user": n_slices_per_user,
        "windows_per_user": n_windows_per_user,
        "bytes_per_user": bytes_per_user,
        "fp32_bytes_per_user": fp32,
        "fp16_bytes_per_user": fp32 / 2,
        "ratio_fp32": fp32 / max(bytes_per_user, 1e-9),
        "ratio_fp16": fp32 / 2 / max(bytes_per_user, 1e-9),
    }


class TokenizerStage(PredictStage):
    """Stage 2: multi-view RQ-VAE with shared and source-specific codebooks.

    Args:
        quantizer: the codebook layout and codebook care (``--model.quantizer.*``; every option
            is documented in :class:`~foundv2.nn.quantizer.QuantizerConfig`; a dict of them is
            taken too, as a checkpoint stores it).
        rqvae: the RQ-VAE around the quantiser (``--model.rqvae.*``: code width, MLP widths,
            reduction, latent norm; :class:`~foundv2.nn.mrqvae.RQVAEConfig`).
        recon_weights: weights of the squared reconstruction error by part of the built-in pooled
            features (``text``, ``item``, ``category``, ``count``, ``value``, ``clock``,
            ``calendar``: :meth:`~foundv2.nn.slices.PooledSliceFeatures.feature_groups`), e.g.
            ``{clock: 20, calendar: 400}``; parts not named keep weight 1, the profile slice is
            not weighted. The summed error is dominated by the wide text, item and category
            parts, so without weights the codes drop the narrow "when" and "how much" parts and
            windows of one item on nearby days share a code tuple. Only the loss changes
            (``val/recon_mse`` stays unweighted; ``recon_weighted`` is what is trained). Not
            available with a features dataset (``data.features_dir``), whose layout is not named.
        optim: the optimiser (``--model.optim.*``, :class:`~foundv2.stages.base.OptimConfig`;
            paper: AdamW at 1e-3, here no weight decay by default).
        item_dim: width of the item codes of the built-in pooled features.
        predict_dir: where ``predict`` writes the tokens dataset and report.json.
        export_dir: where ``fit`` saves the trained tokenizer (save_pretrained folder).
        pretrained: a save_pretrained folder to start from (``foundv2 tokenize`` uses it).
    """

    OUTPUT_KIND = "tokens"
    STAGE = "tokenizer"

    def __init__(
        self,
        quantizer: QuantizerConfig = QuantizerConfig(),
        rqvae: RQVAEConfig = RQVAEConfig(),
        recon_weights: dict[str, float] | None = None,
        optim: OptimConfig = OptimConfig(weight_decay=0.0),
        item_dim: int = 32,
        predict_dir: str | None = None,
        export_dir: str | None = None,
        pretrained: str | None = None,
    ):
        super().__init__(predict_dir)
        self.save_settings("export_dir")
        QuantizerConfig.keep(self.hparams, "quantizer")  # plain dicts in meta.json, hparams.yaml, checkpoints
        RQVAEConfig.keep(self.hparams, "rqvae")
        OptimConfig.keep(self.hparams, "optim")
        self.export_dir = export_dir
        self.model: MultiViewRQVAE | None = None
        self.pooled: PooledSliceFeatures | None = None
        self.sources: list[str] = []
        self.feature_dim: int | None = None
        self.val_collisions: CollisionRate | None = None

    # ------------------------------------------------------------------ building
    def data_dims(self, datamodule) -> dict:
        """A features dataset's sources and width, or what the built-in pooled features need."""
        if datamodule.batch_kind == "slices":
            meta = datamodule.input_meta
            # a slice's width: stage 1's views (and their item means with view_items); older
            # features datasets name only the views' width
            return {"sources": list(meta["sources"]), "feature_dim": int(meta.get("feature_dim", meta["dim"]))}
        dims = datamodule.dims()
        return {"sources": dims["sources"] + (["profile"] if dims["tabular_dim"] else []),
                "pooled": {k: dims[k] for k in POOLED_DIMS}}

    def build_nets(self, dims: dict) -> None:
        hp = self.hparams
        self.sources = list(dims["sources"])
        if dims.get("pooled"):
            self.pooled = PooledSliceFeatures(**dims["pooled"], item_dim=hp.item_dim)
        self.feature_dim = int(dims["feature_dim"]) if "feature_dim" in dims else self.pooled.dim
        # one tuple per (user, window): the profile slice (window 0) joins the first window, as in report.json
        self.val_collisions = CollisionRate(len(self.sources))
        if dims.get("rqvae"):  # a checkpoint: the exact net it holds the weights of
            self.model = MultiViewRQVAE.from_config(dims["rqvae"])
        elif hp.pretrained:
            self.model = self._load_pretrained(hp.pretrained)
        else:
            self.model = MultiViewRQVAE(self.feature_dim, self.sources, RQVAEConfig.from_dict(hp.rqvae),
                                        QuantizerConfig.from_dict(hp.quantizer), self._feature_weights())

    def _feature_weights(self) -> dict[str, list[float]] | None:
        """``recon_weights`` (by part of the pooled features) as one weight per feature column
        for every behaviour source (the profile source, if any, is left unweighted)."""
        given = dict(self.hparams.recon_weights or {})
        if not given:
            return None
        if self.pooled is None:
            raise DataError("model.recon_weights names parts of the built-in pooled slice features, but the "
                            "input is a features dataset (data.features_dir); drop recon_weights or the features_dir.")
        groups = self.pooled.feature_groups()
        unknown = sorted(set(given) - set(groups))
        if unknown:
            raise ValueError(f"model.recon_weights: unknown parts {unknown}; the parts are {list(groups)}")
        columns = [1.0] * self.pooled.dim
        for name, weight in given.items():
            start, stop = groups[name]
            columns[start:stop] = [float(weight)] * (stop - start)
        return {s: columns for s in self.sources[: self.pooled.num_sources]}

    def _load_pretrained(self, folder: str) -> MultiViewRQVAE:
        try:
            model = MultiViewRQVAE.from_pretrained(folder)
        except DataError:  # a damaged export: its message names the file and the fix
            raise
        except Exception as err:  # safetensors / json raise several kinds on a damaged folder
            raise DataError(f"{folder}: the tokenizer folder cannot be loaded ({type(err).__name__}: "
                            f"{err}); export it again with fit's --model.export_dir.") from err
        if list(model.sources) != self.sources:
            raise DataError(f"{folder}: the tokenizer was trained on sources {list(model.sources)}, "
                            f"but this data set has {self.sources}.")
        return model

    def checkpoint_dims(self) -> dict:
        return {**super().checkpoint_dims(), "rqvae": self.model.config} if self.model is not None else {}

    # ------------------------------------------------------------------ steps
    def slices(self, batch: dict) -> dict:
        """The batch's slices: a slice batch as it is, or the pooled features of an event batch."""
        if "feat" in batch:
            return batch
        return with_window_keys(self.pooled(batch), batch, self.pooled.num_sources)

    def model_step(self, batch: dict, stage: str):
        s = self.slices(batch)
        out = self.model(s["feat"].float(), s["slice_source"])
        n = int(s["feat"].shape[0])
        for k, v in out.losses.items():
            self.log(f"{stage}/{k}", v, on_step=stage == "train", on_epoch=True, batch_size=n,
                     sync_dist=stage != "train", prog_bar=k in ("loss", "recon_mse"))
        return out, s

    def training_step(self, batch: dict, batch_idx: int):
        out, _ = self.model_step(batch, "train")
        # a batch without some source leaves its encoder/decoder unused; a zero-weighted term keeps
        # every parameter in the graph so that plain `--trainer.strategy ddp` needs no extra flags
        unused = sum(p.sum() for p in self.model.parameters()) * 0.0
        return out.losses["loss"] + unused

    def validation_step(self, batch: dict, batch_idx: int):
        out, s = self.model_step(batch, "val")
        self.val_collisions.update(batch["user_id"][s["slice_user"]], s["slice_window"], s["slice_source"], out.codes)

    def on_validation_epoch_end(self) -> None:
        stats = self.val_collisions.compute()  # over all ranks
        self.val_collisions.reset()
        # `val/collision_rate` can pick the checkpoint (LC-Rec keeps the lowest-collision one)
        for k, v in stats.items():
            self.log(f"val/{k}", float(v), sync_dist=False, rank_zero_only=False)

    def on_train_epoch_end(self) -> None:
        metrics = self.model.quantizer.usage_metrics()  # summed over ranks at every step
        self.log_dict({f"codebook/{k}": v for k, v in metrics.items()}, sync_dist=False)
        self._log_usage_histograms()
        self.model.quantizer.reset_usage()

    def _log_usage_histograms(self) -> None:
        exp = getattr(self.logger, "experiment", None)
        if exp is None or not hasattr(exp, "add_histogram") or not self.trainer.is_global_zero:
            return
        q = self.model.quantizer
        for li, lv in enumerate(q.levels):
            counts = q.usage[lv.offset: lv.offset + lv.size].float().cpu()
            exp.add_histogram(f"codebook/usage_L{li}", counts, self.current_epoch)

    def on_fit_end(self) -> None:
        if self.export_dir and self.trainer.is_global_zero:
            self.model.save_pretrained(self.export_dir)

    # ------------------------------------------------------------------ predict
    def on_predict_start(self) -> None:
        quantizers = [q for q in (self.model.quantizer, self.model.tabular_quantizer) if q is not None]
        if any(not bool(q.initialised) or int(q.step) == 0 for q in quantizers):
            raise DataError("the tokenizer's quantizer was never initialised (no fit ran: no checkpoint, no "
                            "--model.pretrained folder, and the k-means init never ran), so its codes would say "
                            "nothing about the data. Fit it first (foundv2 fit --config ...), then predict with "
                            "--ckpt_path <the fit's checkpoint> or --model.pretrained <its export_dir>.")

    def predict_step(self, batch: dict, batch_idx: int) -> dict:
        s = self.slices(batch)
        codes = self.model.tokenize(s["feat"].float(), s["slice_source"])
        gids = self.model.global_ids(codes, s["slice_source"])
        return split_by_user({**s, "codes": codes, "token_ids": gids}, batch,
                             per_slice=(("codes", np.int32), ("token_ids", np.int64)))

    def output_info(self) -> dict:
        return {"sources": self.sources, "levels": self.model.quantizer.n_levels,
                "vocab_size": int(self.model.vocab_size), "feature_dim": self.feature_dim}

    def finish_output(self, folder: Path) -> None:
        """Rank 0, the written parts complete in the staging ``folder``: add report.json, so the
        dataset and its report replace the old output together."""
        write_token_report(Path(folder), self.model, self.feature_dim)


def record_batches(folder: Path, meta: dict):
    """Every record batch of a stage output's parts, in part order, read (not memory-mapped: a
    mapping would keep every page read resident until the part is closed)."""
    for part in meta["parts"]:
        with pa.OSFile(str(folder / part)) as source:
            yield from pa.ipc.open_stream(source)


def _flat(batch: pa.RecordBatch, name: str) -> tuple[np.ndarray, np.ndarray]:
    """(slices per user, every user's values in order) of a per-slice list column; a
    fixed-size-list column (``codes``) gives ``[n, L]``."""
    arr = batch.column(name)
    values = arr.flatten()
    if hasattr(values.type, "list_size"):
        values = values.flatten().to_numpy(zero_copy_only=False).reshape(-1, values.type.list_size)
    else:
        values = values.to_numpy(zero_copy_only=False)
    return np.diff(arr.offsets.to_numpy()), values


def window_code_tuples(batch: pa.RecordBatch, sources: int) -> tuple[np.ndarray, np.ndarray]:
    """(``[n_windows, sources·L]`` int32: one row per (user, window) of the batch's users, the codes
    of every source side by side, -1 where a source is absent, as
    :func:`~foundv2.metrics.collisions.window_tuples`; ``[n_windows]`` how many sources each holds)."""
    counts, window = _flat(batch, "slice_window")
    source, codes = _flat(batch, "slice_source")[1].astype(np.int64), _flat(batch, "codes")[1]
    user = np.repeat(np.arange(len(counts), dtype=np.int64), counts)
    key = user * (int(window.max(initial=0)) + 1) + window
    inv = np.unique(key, return_inverse=True)[1].reshape(-1)  # 1-d keys: numpy's own sort is fast
    n = int(inv.max()) + 1 if len(inv) else 0
    out = np.full((n, sources, codes.shape[1]), -1, np.int32)
    out[inv, source] = codes
    return out.reshape(n, -1), (out[:, :, 0] >= 0).sum(1).astype(np.int32)


def unique_rows(rows: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``np.unique(rows, axis=0, return_inverse=True, return_counts=True)`` for integer rows ≥ -1
    (code tuples), ~20x faster: each row is packed losslessly into as few uint64 words as its
    values' bit width allows and the words are sorted together (the distinct rows come in another
    order than ``np.unique``'s)."""
    n, width = rows.shape
    if n == 0:
        return rows[:0], np.zeros(0, np.int64), np.zeros(0, np.int64)
    if int(rows.min()) < -1:
        raise ValueError("unique_rows takes values >= -1")
    bits = max((int(rows.max()) + 1).bit_length(), 1)
    per_word = max(64 // bits, 1)
    words = []
    for start in range(0, width, per_word):
        word = np.zeros(n, np.uint64)
        for j in range(start, min(start + per_word, width)):
            word <<= np.uint64(bits)
            word |= (rows[:, j].astype(np.int64) + 1).astype(np.uint64)
        words.append(word)
    order = np.lexsort(words[::-1])  # the first word is the primary key
    new = np.zeros(n, bool)
    new[0] = True
    for word in words:
        w = word[order]
        new[1:] |= w[1:] != w[:-1]
    group = np.cumsum(new) - 1
    inverse = np.empty(n, np.int64)
    inverse[order] = group
    return rows[order[new]], inverse, np.bincount(group)


def _bucket_of(rows: np.ndarray, buckets: int) -> np.ndarray:
    """A bucket per row from a hash of its values: equal rows land in the same bucket."""
    h = np.zeros(len(rows), np.uint64)
    mult = np.uint64(0x9E3779B97F4A7C15)
    with np.errstate(over="ignore"):
        for j in range(rows.shape[1]):
            h = (h ^ rows[:, j].astype(np.int64).view(np.uint64)) * mult
            h ^= h >> np.uint64(29)
    return (h % np.uint64(buckets)).astype(np.int64)


def token_collisions(folder: Path, meta: dict, users_per_bucket: int = 10_000, chunk_users: int = 2048) -> dict:
    """The collision figures of report.json over a tokens dataset, streamed: each chunk of users'
    (user, window) code tuples (:func:`window_code_tuples`), counted per distinct tuple, goes to one
    of ``1 + users // users_per_bucket`` files by a hash of the tuple, so equal tuples meet in one
    bucket; the buckets are then counted one at a time. Exact, and memory is one chunk's or one
    bucket's distinct tuples, whatever the number of users.

    Returns ``users``, ``slices``, ``windows``, ``collisions`` (as
    :func:`~foundv2.metrics.collisions.collision_stats`), ``collisions_by_sources_in_window`` (as
    :func:`~foundv2.metrics.collisions.collisions_by_sources`), ``collisions_disambiguated`` and
    ``disambiguation_max_index`` (what :func:`~foundv2.nn.mrqvae.disambiguate`'s extra index gives:
    every tuple unique, with indices up to the largest group of equal tuples, minus one)."""
    import os
    import tempfile

    from data_modules.store import TMP_MARK

    sources = len(meta["sources"])
    n_users = n_slices = n_windows = 0
    width = None
    buckets = 1 + sum(_part_rows(folder / p) for p in meta["parts"]) // max(int(users_per_bucket), 1)
    # named with this process's pid (``<name>.tmp-<pid>-report-...``): a killed run's is removed by the next
    with tempfile.TemporaryDirectory(dir=folder.parent, prefix=f"{folder.name}{TMP_MARK}{os.getpid()}-report-") as tmp:
        files: dict[int, object] = {}
        pending: list[pa.RecordBatch] = []

        def flush() -> None:
            nonlocal n_users, n_slices, n_windows, width
            if not pending:
                return
            batch = pa.Table.from_batches(pending).combine_chunks().to_batches()[0]
            pending.clear()
            tuples, _ = window_code_tuples(batch, sources)
            n_users += batch.num_rows
            n_slices += len(_flat(batch, "slice_window")[1])
            n_windows += len(tuples)
            width = tuples.shape[1]
            if not len(tuples):
                return
            uniq, _, count = unique_rows(tuples)
            rows = np.concatenate([uniq, count.astype(np.int32)[:, None]], axis=1)
            which = _bucket_of(uniq, buckets)
            order = np.argsort(which, kind="stable")
            bounds = np.searchsorted(which[order], np.arange(buckets + 1))
            for b in np.flatnonzero(np.diff(bounds)).tolist():
                if b not in files:
                    files[b] = open(Path(tmp) / f"bucket-{b:05d}.bin", "wb")  # noqa: SIM115 - closed below
                files[b].write(rows[order[bounds[b]:bounds[b + 1]]].tobytes())

        for batch in record_batches(folder, meta):
            pending.append(batch)
            if sum(b.num_rows for b in pending) >= chunk_users:
                flush()
        flush()
        for f in files.values():
            f.close()
        repeated = max_dup = n_unique = 0
        by_present: dict[int, list[int]] = {}  # sources in the window → [windows, repeated windows]
        for b in sorted(files):
            rows = np.fromfile(Path(tmp) / f"bucket-{b:05d}.bin", np.int32).reshape(-1, width + 1)
            uniq, inverse, _ = unique_rows(rows[:, :width])
            total = np.zeros(len(uniq), np.int64)
            np.add.at(total, inverse.reshape(-1), rows[:, width].astype(np.int64))
            rep = total > 1
            repeated += int(total[rep].sum())
            max_dup = max(max_dup, int(total.max()))
            n_unique += len(uniq)
            present = (uniq.reshape(len(uniq), sources, -1)[:, :, 0] >= 0).sum(1)
            for k in np.unique(present).tolist():
                m = present == k
                got = by_present.setdefault(int(k), [0, 0])
                got[0] += int(total[m].sum())
                got[1] += int(total[m & rep].sum())
    if n_windows == 0:
        stats = after = {"collision_rate": 0.0, "max_dup": 0.0, "unique_frac": 1.0}
    else:
        stats = {"collision_rate": repeated / n_windows, "max_dup": float(max_dup), "unique_frac": n_unique / n_windows}
        after = {"collision_rate": 0.0, "max_dup": 1.0, "unique_frac": 1.0}
    return {
        "users": n_users, "slices": n_slices, "windows": n_windows,
        "collisions": stats,
        "collisions_by_sources_in_window": {str(k): {"windows": w / n_windows, "collision_rate": r / w}
                                            for k, (w, r) in sorted(by_present.items())},
        "collisions_disambiguated": after,
        "disambiguation_max_index": max(max_dup - 1, 0),
    }


def _part_rows(path: Path) -> int:
    """Rows of one Arrow stream part (its record batches' lengths; no column is read)."""
    with pa.memory_map(str(path)) as source:
        return sum(batch.num_rows for batch in pa.ipc.open_stream(source))


def write_token_report(folder: Path, model: MultiViewRQVAE, feature_dim: int) -> dict:
    """Collisions of whole (user, window) code tuples, with and without disambiguation, and storage
    (:func:`token_collisions`, streamed over the parts: never every user's codes at once)."""
    folder = Path(folder)
    meta = read_output_meta(folder)
    if meta is None:
        raise DataError(f"{folder}: no complete stage output here (meta.json missing).")
    got = token_collisions(folder, meta)
    n_users = got["users"]
    report = {
        "users": n_users,
        "collisions": got["collisions"],
        "collisions_by_sources_in_window": got["collisions_by_sources_in_window"],
        "collisions_disambiguated": got["collisions_disambiguated"],
        "disambiguation_max_index": got["disambiguation_max_index"],
        "storage": storage_report(model, got["slices"] / max(n_users, 1), got["windows"] / max(n_users, 1), feature_dim),
    }
    atomic_write_json(folder / "report.json", report)
    return report
