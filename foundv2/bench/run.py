"""``foundv2 bench``: protocol ``foundv2-bench-v1`` over every representation that exists.

Reads the prepared data (labels, history, future), builds each representation per user,
fits the same probes on each, trains the baselines on the same split in the same run, and
writes ``bench.json``, ``report.md``, PNG plots and TensorBoard scalars into one folder.
Nothing is tuned on the test users: C, λ, k and early stopping use the validation users.

Nothing finished is lost: every (row, task) result is written to ``progress.json`` (and its test
scores under ``scores/``) as soon as it exists, and a rerun with the same inputs picks up where a
killed or failed run stopped. ``bench.json`` is the completeness marker and is written last, after
``report.md``, the plots and TensorBoard; the progress files are removed after it. The probes'
per-step lines and repeated warnings go to ``bench.log`` in the output folder, not the console.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import os
import platform
import shutil
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import numpy as np
import scipy.sparse as sp
import torch

from data_modules.datamodule import UserDataModule
from data_modules.schema import DataError, DatasetSpec
from data_modules.store import Split, atomic_write_bytes, atomic_write_json, read_output_meta
from foundv2.bench import baselines as B
from foundv2.bench.probes import fit_logistic_probe, fit_next_item_probe
from foundv2.console import log_to_file

log = logging.getLogger(__name__)
PROTOCOL = "foundv2-bench-v1"
TASK_KINDS = ("binary", "multiclass", "multilabel")
#: baselines that read item ids (skipped, with next_items, on a data set without items)
ITEM_BASELINES = ("tfidf", "tfidf_svd", "top_items", "popularity", "ease", "itemknn", "sasrec")
ALL_BASELINES = ("tfidf", "tfidf_svd", "top_items", "activity", "majority", "popularity", "ease", "itemknn", "sasrec")
RANKING_ONLY = ("popularity", "ease", "itemknn", "sasrec")
PROGRESS_FILE = "progress.json"
SCORES_DIR = "scores"
LOG_FILE = "bench.log"


@dataclass
class Task:
    name: str
    kind: str  # binary | multiclass | multilabel | ranking
    y: np.ndarray | None = None


@dataclass
class BenchData:
    """Per-user arrays indexed by the prepared table's row."""

    spec: DatasetSpec
    split: np.ndarray
    history: sp.csr_matrix
    future: sp.csr_matrix
    sequences: list[np.ndarray]
    tasks: list[Task] = field(default_factory=list)
    sources: list[np.ndarray] = field(default_factory=list)  # per user: history event sources
    times: list[np.ndarray] = field(default_factory=list)  # ... timestamps (s)
    values: list[np.ndarray] = field(default_factory=list)  # ... values (NaN: none)

    @property
    def has_items(self) -> bool:
        """Whether any history or future event carries an item id."""
        return self.history.shape[1] > 0 and (self.history.nnz > 0 or self.future.nnz > 0)


def _check_label(name: str, kind: str, y: np.ndarray, split: np.ndarray, dataset: str) -> None:
    """A DataError for a label no probe can learn: an unknown kind, or a single class."""
    if kind not in TASK_KINDS:
        raise DataError(
            f"{dataset}: label '{name}' has kind '{kind}', which the bench does not know; use one of "
            f"{', '.join(TASK_KINDS)} in the data config's labels."
        )
    for where, rows in (("all users", slice(None)), ("the train users", split == Split.TRAIN)):
        classes = np.unique(y[rows], axis=0) if y.ndim == 2 else np.unique(y[rows])
        if (y.ndim == 1 and classes.size < 2) or (y.ndim == 2 and len(classes) < 2):
            raise DataError(
                f"{dataset}: label '{name}' ({kind}) has a single value among {where} "
                f"({classes[:1].tolist()}), so no probe can be fitted or scored on it; drop it from the data "
                f"config's labels or give it at least two classes."
            )


def load_bench_data(dm: UserDataModule) -> BenchData:
    """History/future item matrices, item sequences, history events and every task's labels."""
    dm.setup()
    spec = dm.spec
    n_items = int(dm.meta["num_items"])
    cols = ["h_item", "f_item", "f_category", "h_source", "h_time", "h_value"]
    table = dm.table.with_format("numpy", columns=cols)
    U = len(dm.table)
    rows_h, cols_h, rows_f, cols_f, seqs, srcs, times, values = [], [], [], [], [], [], [], []
    fut_cat = np.zeros((U, len(spec.categories)), np.int64)
    for start in range(0, U, 4096):
        part = table[start : start + 4096]
        for i in range(len(part["h_item"])):
            u = start + i
            h = np.asarray(part["h_item"][i], np.int64)
            h = h[h > 0] - 1
            f = np.asarray(part["f_item"][i], np.int64)
            f = f[f > 0] - 1
            seqs.append(h)
            rows_h.append(np.full(len(h), u))
            cols_h.append(h)
            rows_f.append(np.full(len(f), u))
            cols_f.append(f)
            fc = np.asarray(part["f_category"][i], np.int64)
            fut_cat[u, fc[fc >= 0]] = 1
            srcs.append(np.asarray(part["h_source"][i], np.int64))
            times.append(np.asarray(part["h_time"][i], np.int64))
            values.append(np.asarray(part["h_value"][i], np.float64))
    cat = lambda xs: np.concatenate(xs) if xs else np.zeros(0, np.int64)  # noqa: E731
    history = sp.csr_matrix((np.ones(len(cat(rows_h))), (cat(rows_h), cat(cols_h))), shape=(U, n_items))
    future = sp.csr_matrix((np.ones(len(cat(rows_f))), (cat(rows_f), cat(cols_f))), shape=(U, n_items))
    future.data[:] = 1.0
    split = dm.split.copy()
    tasks = []
    for lab in spec.labels:
        if lab.kind == "multilabel":
            continue
        y = np.asarray(dm.table[f"label/{lab.name}"], np.int64)
        _check_label(lab.name, lab.kind, y, split, spec.name)
        tasks.append(Task(lab.name, lab.kind, y))
    if spec.categories and fut_cat.any():
        name = "future_genres" if spec.name.startswith("movielens") else "future_categories"
        tasks.append(Task(name, "multilabel", fut_cat))
    tasks.append(Task("next_items", "ranking"))
    if not (split == Split.TEST).any():
        raise DataError(f"{spec.name}: the split has no test users, so there is nothing to score; "
                        f"use more users or check the split fractions.")
    return BenchData(spec, split, history, future, seqs, tasks, srcs, times, values)


# ---------------------------------------------------------------------------------- representations
def pooled_representation(dm: UserDataModule) -> tuple[np.ndarray, float]:
    """Mean over every history slice of the parameter-free slice features.

    The sources fill mostly different columns of a slice feature (text, item codes, category
    histogram, values), so one mean keeps them apart at a quarter of a per-source concatenation's
    width, which keeps the probes fast.
    """
    from foundv2.nn.slices import PooledSliceFeatures, mean_by_user

    d = dm.dims()
    net = PooledSliceFeatures(d["num_sources"], d["num_items"], d["num_categories"], d["text_dim"], d["tabular_dim"],
                              calendar_dim=d["calendar_dim"])
    out = np.zeros((len(dm.table), net.dim), np.float32)
    for batch in dm.predict_dataloader():
        s = net(batch)
        out[batch["row"].numpy()] = mean_by_user(s["feat"], s["slice_user"], batch["user_id"].shape[0]).numpy()
    return out, float(out.shape[1] * 4)


@contextlib.contextmanager
def _readable(folder: Path, what: str) -> Iterator[None]:
    """Turn any failure to read a stage output / export folder into one DataError naming it."""
    try:
        yield
    except DataError:
        raise
    except Exception as err:  # noqa: BLE001 - a corrupt folder fails in many libraries' ways
        raise DataError(
            f"{folder}: the {what} cannot be read ({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}); "
            f"it is truncated, corrupt or from another version: rerun the step that writes it."
        ) from None


def token_bytes(tokens_dir: Path) -> float:
    """Bytes per user of a tokens output, from its ``report.json`` (``storage.bytes_per_user``)."""
    with _readable(tokens_dir, "tokens' report.json"):
        return float(json.loads((tokens_dir / "report.json").read_text())["storage"]["bytes_per_user"])


def token_representations(tokens_dir: Path, tokenizer_dir: Path | None, n_rows: int) -> dict:
    """``tokens_bag`` (counts of global token ids) and ``tokens_sum`` (summed code vectors per source)."""
    from data_modules.store import read_stage_output

    bytes_per_user = token_bytes(tokens_dir)
    with _readable(tokens_dir, "tokens output"):
        ds, meta = read_stage_output(tokens_dir)
        ds = ds.with_format("numpy")
        vocab = int(meta["vocab_size"])
        S = len(meta["sources"])
    model = None
    if tokenizer_dir is not None and (tokenizer_dir / "config.json").exists():
        from foundv2.nn.mrqvae import MultiViewRQVAE

        with _readable(tokenizer_dir, "tokenizer export"):
            model = MultiViewRQVAE.from_pretrained(tokenizer_dir).eval()
    rows, cols = [], []
    summed = None
    with _readable(tokens_dir, "tokens output"):
        for start in range(0, len(ds), 2048):
            part = ds[start : start + 2048]
            for r, ids, codes, src in zip(
                part["row"], part["token_ids"], part["codes"], part["slice_source"], strict=True
            ):
                if len(src) == 0:
                    continue
                ids = np.stack(ids) if ids.dtype == object else ids
                flat = ids.reshape(-1)
                flat = flat[flat >= 0]
                rows.append(np.full(len(flat), r))
                cols.append(flat)
                if model is not None:
                    codes = np.stack(codes) if codes.dtype == object else codes
                    with torch.no_grad():
                        q = model.quantizer.decode_codes(
                            torch.as_tensor(codes, dtype=torch.long), torch.as_tensor(src, dtype=torch.long)
                        )
                    if summed is None:
                        summed = np.zeros((n_rows, S, q.shape[1]), np.float32)
                    np.add.at(summed[r], src.astype(np.int64), q.numpy())
    r = np.concatenate(rows) if rows else np.zeros(0, np.int64)
    c = np.concatenate(cols) if cols else np.zeros(0, np.int64)
    bag = sp.csr_matrix((np.ones(len(r), np.float32), (r, c)), shape=(n_rows, vocab))
    reps = {"tokens_bag": (bag, bytes_per_user)}
    if summed is not None:
        reps["tokens_sum"] = (summed.reshape(n_rows, -1), bytes_per_user)
    reps["_usage"] = np.asarray(bag.sum(0)).ravel()
    reps["_levels"] = meta["levels"]
    return reps


def embedding_representation(folder: Path, n_rows: int, column: str = "user_emb") -> tuple[np.ndarray, float]:
    """A per-user embedding column of a stage output (stage 1, stage 3, Q-Anchor)."""
    from data_modules.store import read_stage_output

    with _readable(folder, "embedding output"):
        ds, _ = read_stage_output(folder)
        if column not in ds.column_names:
            raise DataError(
                f"{folder}: no '{column}' column in this stage output; columns are {ds.column_names}."
            )
        ds = ds.with_format("numpy", columns=["row", column])
        emb = np.asarray(ds[column], np.float32)
        out = np.zeros((n_rows, emb.shape[1]), np.float32)
        out[np.asarray(ds["row"])] = emb
    return out, float(emb.shape[1] * 4)


# ---------------------------------------------------------------------------------- rows
@dataclass
class Row:
    """One line of the bench: how to build its features (or run it), its size and its tasks."""

    name: str
    kind: str  # tokens | representation | baseline
    bytes_per_user: float | None  # None: not bounded (a model over the full history), or float32 × the
    # built features' width for kind "representation" (set once built)
    storage: str
    tasks: list[str]
    build: Callable[[], object] | None = None  # → features X, probed on every task
    run: Callable[[Task, dict], dict] | None = None  # (task, scores_out) → metrics, for model baselines
    build_task: Callable[[Task], object] | None = None  # → features X of one task (e.g. Q-Anchor: its own query)


def _fmt_storage(b: float | None) -> str:
    return "unbounded" if b is None else f"{b:,.0f} B"


def _rows(data: BenchData, dm: UserDataModule, tokens_dir: str | None, tokenizer_dir: str | None,
          embeddings: dict[str, str], baselines: list[str], representations: list[str],
          storage_bytes: list[int], sasrec_epochs: int, seed: int, tasks: list[Task],
          qanchor: list | None = None) -> tuple[list[Row], dict]:
    """Every row of this run, in report order, with lazily built features."""
    n_rows = len(data.split)
    cls_tasks = [t.name for t in tasks if t.kind != "ranking"]
    all_tasks = [t.name for t in tasks]
    rank_tasks = [t.name for t in tasks if t.kind == "ranking"]
    rows: list[Row] = []
    extra: dict = {}
    if "pooled" in representations:
        rows.append(Row("pooled", "representation", None, "float32 × dim", all_tasks,
                        build=lambda: pooled_representation(dm)[0]))
    tok_bytes = None
    if tokens_dir:
        tok_bytes = token_bytes(Path(tokens_dir))
        cache: dict = {}

        def tokens(name: str):
            if not cache:
                cache.update(token_representations(Path(tokens_dir), Path(tokenizer_dir) if tokenizer_dir else None,
                                                   n_rows))
                extra["usage"] = (cache["_usage"].tolist(), cache["_levels"])
            if name not in cache:
                raise DataError(f"{tokenizer_dir}: no tokenizer export (config.json) to sum code vectors for "
                                f"'{name}'; pass tokenizer_dir or leave '{name}' out of representations.")
            return cache[name][0]

        for name in ("tokens_bag", "tokens_sum"):
            if name in representations and (name != "tokens_sum" or tokenizer_dir):
                rows.append(Row(name, "tokens", tok_bytes, "codes as stored (tokens' report.json)", all_tasks,
                                build=lambda name=name: tokens(name)))
    for name, folder in (embeddings or {}).items():
        def emb(folder=folder):
            return embedding_representation(Path(folder), n_rows)[0]

        meta = read_output_meta(folder) or {}
        if meta.get("row_kind") == "tokens":  # e.g. stage 3: built from the tokens alone, its weights shared
            rows.append(Row(name, "tokens", float(meta["bytes_per_user"]),
                            "the tokens as stored (the model's weights are shared by all users)", all_tasks, build=emb))
        else:
            rows.append(Row(name, "representation", None, "float32 × dim", all_tasks, build=emb))
    for qa in qanchor or []:  # base, prompt-tuned and no-query rows of each Q-Anchor model
        size, kind, what = qa.bytes_per_user(tok_bytes if qa.prefix == "tokens" else None)
        for name in qa.row_names:
            rows.append(Row(name, kind, size, what, all_tasks,
                            build_task=lambda task, qa=qa, name=name: qa.build()[name][task.name]))
    sizes = sorted({int(b) for b in storage_bytes} | ({int(round(tok_bytes))} if tok_bytes else set()))
    tfidf_cache: dict = {}

    def tfidf():
        if "X" not in tfidf_cache:
            tfidf_cache["X"] = B.tfidf_features(data.history, data.split)
        return tfidf_cache["X"]

    for name in baselines:
        if name not in ALL_BASELINES:
            raise DataError(f"unknown baseline '{name}'; known: {', '.join(ALL_BASELINES)}.")
        if name in ITEM_BASELINES and not data.has_items:
            continue
        if name == "tfidf":
            rows.append(Row("tfidf", "baseline", float(data.history.nnz / max(n_rows, 1) * 8),
                            "sparse (uint32 id, float32 weight) pairs, mean over users", all_tasks, build=tfidf))
        elif name == "tfidf_svd":
            seen = set()
            for k in sizes:
                k_eff = int(min(k, data.history.shape[1] - 1, int((data.split == Split.TRAIN).sum()) - 1))
                if k_eff < 1 or k_eff in seen:
                    continue
                seen.add(k_eff)
                rows.append(Row(f"tfidf_svd{k_eff}_int8", "baseline", float(k_eff),
                                "int8 × k (k float32 scales shared by all users)", all_tasks,
                                build=lambda k=k_eff: B.dequantise_int8(*B.tfidf_svd_int8(data.history, data.split, k,
                                                                                          seed))))
        elif name == "top_items":
            seen = set()
            for b in sizes:
                n_bytes = B.UINT16_BYTES * (b // B.UINT16_BYTES)
                if n_bytes < B.UINT16_BYTES or n_bytes in seen:
                    continue
                seen.add(n_bytes)
                rows.append(Row(f"top_items{n_bytes}", "baseline", float(n_bytes),
                                f"{n_bytes // 2} uint16 item ids (padded)", all_tasks,
                                build=lambda n=n_bytes: B.tfidf_features(B.top_items(data.history, n), data.split)))
        elif name == "activity":
            def act():
                return B.activity_features(data.sources, data.times, data.values, len(data.spec.sources),
                                           data.split)[0]

            dim = len(B.activity_features([], [], [], len(data.spec.sources), data.split[:0])[1])
            rows.append(Row("activity", "baseline", float(dim * 4), "float32 × dim", all_tasks, build=act))
        elif name == "majority":
            def maj(task: Task, out: dict) -> dict:
                return B.majority(task.y, data.split, task.kind, scores_out=out)[0]

            rows.append(Row("majority", "baseline", 0.0, "none (a constant)", cls_tasks, run=maj))
        elif name in RANKING_ONLY:
            def ranker(task: Task, out: dict, name=name) -> dict:
                if name == "sasrec":
                    cfg = B.SASRecConfig(epochs=sasrec_epochs, seed=seed)
                    return B.sasrec(data.sequences, data.future, data.split, cfg, history=data.history,
                                    scores_out=out)[0]
                return getattr(B, name)(data.history, data.future, data.split, scores_out=out)[0]

            size, what = (0.0, "none (one ranking for all)") if name == "popularity" else (None, "the full history")
            rows.append(Row(name, "baseline", size, what, rank_tasks, run=ranker))
    return rows, extra


# ---------------------------------------------------------------------------------- evaluation
def probe_task(X, task: Task, data: BenchData, probe_epochs: int, probe_batch_size: int, seed: int,
               scores_out: dict) -> dict:
    """The protocol's probe of one representation on one task (test metrics, test scores in scores_out)."""
    if task.kind == "ranking":
        # 256 users a step: a quarter of the optimiser steps of 64 for the same epochs
        return fit_next_item_probe(X, data.history, data.future, data.split, epochs=probe_epochs,
                                   batch_size=probe_batch_size, seed=seed, scores_out=scores_out)
    return fit_logistic_probe(X, task.y, data.split, task.kind, seed=seed, scores_out=scores_out)


def _versions() -> dict:
    v = {}
    for lib in ("torch", "lightning", "torchmetrics", "datasets", "transformers", "scikit-learn", "numpy"):
        try:
            v[lib] = version(lib)
        except PackageNotFoundError:
            v[lib] = None
    return v


@contextlib.contextmanager
def _quiet(log_path: Path) -> Iterator[None]:
    """Send every log line (the per-C probe lines included) and every Python warning, once per
    place, to ``log_path`` instead of the console (:func:`foundv2.console.log_to_file`)."""
    with log_to_file(log_path), warnings.catch_warnings():
        warnings.simplefilter("default")
        yield


def _save_scores(folder: Path, row: str, task: str, scores: np.ndarray) -> None:
    buf = io.BytesIO()
    np.save(buf, np.asarray(scores), allow_pickle=False)
    atomic_write_bytes(folder / SCORES_DIR / f"{row}.{task}.npy", buf.getvalue())


def _paired(out_dir: Path, pairs: list[list[str]], tasks: list[Task], labels: dict) -> dict:
    """``task → [{a, b, delta, lo, hi, p_le_0, n}]`` for each requested pair of rows that both have
    that task's test scores (see :func:`~foundv2.bench.probes.paired_bootstrap`)."""
    from foundv2.bench.probes import paired_bootstrap

    out: dict[str, list] = {}
    for t in tasks:
        for a, b in pairs:
            sa, sb = load_scores(out_dir, a, t.name), load_scores(out_dir, b, t.name)
            if sa is None or sb is None:
                continue
            d = paired_bootstrap(t.kind, sa, sb, labels.get(t.name))
            out.setdefault(t.name, []).append({"a": a, "b": b, **{k: float(v) for k, v in d.items()}})
    return out


def load_scores(folder: Path, row: str, task: str) -> np.ndarray | None:
    """The test scores of one (row, task) saved by this run (None when there are none)."""
    path = Path(folder) / SCORES_DIR / f"{row}.{task}.npy"
    return np.load(path, allow_pickle=False) if path.exists() else None


def _fingerprint(dm: UserDataModule, inputs: dict) -> str:
    """What must match for a rerun to reuse finished (row, task) results."""
    parts = {"prepared": str(dm.prepared_dir), "inputs": inputs}
    for key in ("tokens_dir", "tokenizer_dir"):
        if inputs.get(key):
            for f in ("meta.json", "report.json", "config.json"):
                p = Path(inputs[key]) / f
                parts[f"{key}/{f}"] = hashlib.sha256(p.read_bytes()).hexdigest() if p.exists() else None
    for name, folder in (inputs.get("embeddings") or {}).items():
        p = Path(folder) / "meta.json"
        parts[f"emb/{name}"] = hashlib.sha256(p.read_bytes()).hexdigest() if p.exists() else None
    for name, ckpt in (inputs.get("qanchor") or {}).items():
        from foundv2.bench.qanchor import checkpoint_path

        st = checkpoint_path(ckpt).stat()
        parts[f"qanchor/{name}"] = [st.st_size, st.st_mtime_ns]
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def run_bench(
    dm: UserDataModule,
    output_dir: str,
    tokens_dir: str | None = None,
    tokenizer_dir: str | None = None,
    embeddings: dict[str, str] | None = None,
    baselines: list[str] | None = None,
    representations: list[str] | None = None,
    storage_bytes: list[int] | None = None,
    sasrec_epochs: int = 15,
    probe_epochs: int = 30,
    seed: int = 0,
    skip_tasks: list[str] | None = None,
    compare: list[list[str]] | None = None,
    qanchor: dict[str, str] | None = None,
    qanchor_queries: dict[str, str] | None = None,
    qanchor_tune_steps: int = 300,
    qanchor_prompt_tokens: int = 6,
    progress: bool = True,
    resume: bool = True,
) -> dict:
    """Run the whole protocol; returns the bench.json dict.

    Args:
        dm: the data (its prepared cache is reused).
        output_dir: where bench.json, report.md, the plots, tb/ and bench.log go.
        tokens_dir: a tokens dataset (TokenizerStage predict) for the token rows.
        tokenizer_dir: the tokenizer's export folder, to sum code vectors (``tokens_sum``).
        embeddings: name → a stage output folder with a ``user_emb`` column (e.g. stage 1).
        baselines: which baselines to train (default: all of tfidf, tfidf_svd, top_items,
            activity, majority, popularity, ease, itemknn, sasrec; those that need item ids are
            skipped on a data set without items).
        representations: which built-in representations to probe (pooled, tokens_bag, tokens_sum).
        storage_bytes: sizes (bytes per user) of the storage-matched baselines ``tfidf_svd<k>_int8``
            and ``top_items<k>``; the token rows' size is always added (default 16 and 64).
        sasrec_epochs: SASRec's epoch budget (early-stopped on val).
        probe_epochs: the next-item probe's epoch budget (early-stopped on val).
        seed: seed of the probes.
        skip_tasks: tasks left out (a quick bench, e.g. ["next_items"]).
        compare: pairs of rows ``[a, b]`` compared on every task with the paired 95 % interval of
            ``a - b`` (bench.json ``pairs``), whatever their sizes: e.g. stage 3 against the token
            bag it reads, or an ablation against the full model.
        qanchor: name → a QAnchorStage checkpoint (or a pipeline qanchor step's ``model``
            folder): rows ``<name>`` (each task its own query), ``<name>_tuned`` (plus a
            scenario prompt tuned per task on the training users) and ``<name>_noquery``
            (:mod:`foundv2.bench.qanchor`); a token-prefix model reads ``tokens_dir``.
        qanchor_queries: task → the query it is asked with (defaults:
            ``foundv2.bench.qanchor.TASK_QUERIES``).
        qanchor_tune_steps: scenario-tuning steps per task.
        qanchor_prompt_tokens: learned prompt tokens per scenario.
        progress: show one progress bar over rows × tasks.
        resume: reuse the finished (row, task) results of an unfinished run with the same inputs.
    """
    inputs = {"tokens_dir": tokens_dir, "tokenizer_dir": tokenizer_dir, "embeddings": embeddings or {},
              "baselines": baselines, "representations": representations, "storage_bytes": storage_bytes,
              "sasrec_epochs": sasrec_epochs, "probe_epochs": probe_epochs, "seed": seed, "skip_tasks": skip_tasks,
              "compare": [list(p) for p in compare or []], "qanchor": qanchor or {},
              "qanchor_queries": qanchor_queries, "qanchor_tune_steps": qanchor_tune_steps,
              "qanchor_prompt_tokens": qanchor_prompt_tokens}
    out_dir = Path(output_dir)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "bench.json").unlink(missing_ok=True)  # this folder is being rewritten: no stale marker
    except OSError as err:
        raise DataError(f"{out_dir}: the bench's output folder cannot be written ({err.strerror}); "
                        f"pick another output_dir or fix its permissions.") from None
    with _quiet(out_dir / LOG_FILE):
        return _run(dm, out_dir, inputs, progress, resume)


def _run(dm: UserDataModule, out_dir: Path, inputs: dict, progress: bool, resume: bool) -> dict:
    from tqdm.auto import tqdm

    skip = tuple(inputs["skip_tasks"] or ())
    seed = inputs["seed"]
    torch.manual_seed(seed)
    np.random.seed(seed)
    t_start = time.perf_counter()
    dm.prepare_data()
    data = load_bench_data(dm)
    tasks = [t for t in data.tasks if t.name not in skip]
    notes = []
    if not data.has_items:
        tasks = [t for t in tasks if t.kind != "ranking"]
        notes.append(f"{data.spec.name} has no item ids: next_items and the item baselines "
                     f"({', '.join(ITEM_BASELINES)}) are skipped.")
    elif data.future.nnz == 0:
        tasks = [t for t in tasks if t.kind != "ranking"]
        notes.append(f"{data.spec.name} holds no future events back (future_frac 0: labels from a separate "
                     f"period): next_items and the future-behaviour tasks are skipped.")
    for note in notes:
        print(f"bench: {note}", flush=True)
    names = list(ALL_BASELINES if inputs["baselines"] is None else inputs["baselines"])
    wanted = inputs["representations"] or ["pooled", "tokens_bag", "tokens_sum"]
    from foundv2.bench.qanchor import QAnchorRows

    qanchor = [QAnchorRows(name, ckpt, dm, tasks, out_dir, inputs["tokens_dir"], inputs["qanchor_queries"],
                           inputs["qanchor_tune_steps"], inputs["qanchor_prompt_tokens"], seed)
               for name, ckpt in inputs["qanchor"].items()]
    rows, extra = _rows(data, dm, inputs["tokens_dir"], inputs["tokenizer_dir"], inputs["embeddings"], names, wanted,
                        inputs["storage_bytes"] or [16, 64], inputs["sasrec_epochs"], seed, tasks, qanchor)
    fp = _fingerprint(dm, inputs)
    prog_path = out_dir / PROGRESS_FILE
    done: dict = {}
    if resume and prog_path.exists():
        with contextlib.suppress(OSError, json.JSONDecodeError):
            saved = json.loads(prog_path.read_text())
            if saved.get("fingerprint") == fp:
                done = saved.get("results", {})
    if not done:
        shutil.rmtree(out_dir / SCORES_DIR, ignore_errors=True)
    by_name = {t.name: t for t in tasks}
    results: dict[str, dict] = {}
    for row in rows:
        results[row.name] = {"kind": row.kind, "bytes_per_user": row.bytes_per_user, "storage": row.storage}
        for task in row.tasks:
            if task in done.get(row.name, {}) and load_scores(out_dir, row.name, task) is not None:
                results[row.name][task] = done[row.name][task]
                results[row.name]["bytes_per_user"] = done[row.name]["bytes_per_user"]
    n_jobs = sum(len(r.tasks) for r in rows)
    bar = tqdm(total=n_jobs, desc="bench", unit="probe", disable=not progress, file=sys.stderr, dynamic_ncols=True)
    bar.update(sum(1 for r in rows for t in r.tasks if t in results[r.name]))
    try:
        for row in rows:
            todo = [t for t in row.tasks if t not in results[row.name]]
            if not todo:
                continue
            bar.set_postfix_str(row.name)
            X = row.build() if row.build is not None else None
            for name in todo:
                task = by_name[name]
                if row.build_task is not None:  # features of this task alone (Q-Anchor: its own query)
                    X = row.build_task(task)
                if row.kind == "representation" and X is not None:
                    results[row.name]["bytes_per_user"] = float(X.shape[1] * 4)
                bar.set_postfix_str(f"{row.name} / {name}")
                t0 = time.perf_counter()
                scores: dict = {}
                res = row.run(task, scores) if row.run else probe_task(X, task, data, inputs["probe_epochs"],
                                                                       256, seed, scores)
                test = scores["test"]
                if task.kind == "ranking":
                    from foundv2.bench.report import MAIN

                    test = test[MAIN["ranking"]]
                _save_scores(out_dir, row.name, name, test)
                results[row.name][name] = {**{k: float(v) for k, v in res.items()}, "seconds": time.perf_counter() - t0}
                log.info("%s / %s: %s", row.name, name, results[row.name][name])
                atomic_write_json(prog_path, {"fingerprint": fp, "results": results})
                bar.update(1)
            del X
    finally:
        bar.close()
    bench = {
        "protocol": PROTOCOL,
        "dataset": dm.hparams.dataset,
        "split_sizes": {s.name.lower(): int((data.split == s).sum()) for s in Split},
        "seed": seed,
        "split_seed": dm.hparams.split_seed,
        "num_items": int(data.history.shape[1]),
        "has_items": data.has_items,
        "notes": notes + [n for qa in qanchor for n in qa.notes],
        "tasks": {t.name: t.kind for t in tasks},
        "storage_bytes": sorted({int(b) for b in inputs["storage_bytes"] or [16, 64]}),
        "versions": _versions(),
        "machine": {"cores": os.cpu_count(), "platform": platform.platform()},
        "seconds": time.perf_counter() - t_start,
        "results": results,
        "inputs": {k: inputs[k] for k in ("tokens_dir", "tokenizer_dir", "embeddings", "qanchor")},
    }
    from foundv2.bench.report import write_report

    labels = {t.name: t.y[data.split == Split.TEST] for t in tasks if t.y is not None}
    bench["pairs"] = _paired(out_dir, inputs["compare"], tasks, labels)
    write_report(bench, out_dir, extra.get("usage"), labels)
    prog_path.unlink(missing_ok=True)
    shutil.rmtree(out_dir / SCORES_DIR, ignore_errors=True)
    return bench
