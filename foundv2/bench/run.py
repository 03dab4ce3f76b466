"""``foundv2 bench``: protocol ``foundv2-bench-v1`` over every representation that exists.

Reads the prepared data (labels, history, future), builds each representation per user,
fits the same probes on each, trains the baselines on the same split in the same run, and
writes ``bench.json``, ``report.md``, PNG plots and TensorBoard scalars into one folder.
Nothing is tuned on the test users: C, λ, k and early stopping use the validation users.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import time
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import numpy as np
import scipy.sparse as sp
import torch

from data_modules.datamodule import UserDataModule
from data_modules.schema import DataError, DatasetSpec
from foundv2.bench import baselines as B
from foundv2.bench.probes import fit_logistic_probe, fit_next_item_probe

log = logging.getLogger(__name__)
PROTOCOL = "foundv2-bench-v1"


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


def load_bench_data(dm: UserDataModule) -> BenchData:
    """History/future item matrices, item sequences and every task's labels from the prepared data."""
    dm.setup()
    spec = dm.spec
    n_items = int(dm.meta["num_items"])
    table = dm.table.with_format("numpy", columns=["h_item", "f_item", "f_category"])
    U = len(dm.table)
    rows_h, cols_h, rows_f, cols_f, seqs = [], [], [], [], []
    fut_cat = np.zeros((U, len(spec.categories)), np.int64)
    for start in range(0, U, 4096):
        part = table[start : start + 4096]
        for i, (h, f, fc) in enumerate(zip(part["h_item"], part["f_item"], part["f_category"], strict=True)):
            u = start + i
            h = np.asarray(h, np.int64)
            h = h[h > 0] - 1
            f = np.asarray(f, np.int64)
            f = f[f > 0] - 1
            seqs.append(h)
            rows_h.append(np.full(len(h), u))
            cols_h.append(h)
            rows_f.append(np.full(len(f), u))
            cols_f.append(f)
            fc = np.asarray(fc, np.int64)
            fut_cat[u, fc[fc >= 0]] = 1
    cat = lambda xs: np.concatenate(xs) if xs else np.zeros(0, np.int64)  # noqa: E731
    history = sp.csr_matrix((np.ones(len(cat(rows_h))), (cat(rows_h), cat(cols_h))), shape=(U, n_items))
    future = sp.csr_matrix((np.ones(len(cat(rows_f))), (cat(rows_f), cat(cols_f))), shape=(U, n_items))
    future.data[:] = 1.0
    tasks = [
        Task(lab.name, lab.kind, np.asarray(dm.table[f"label/{lab.name}"], np.int64))
        for lab in spec.labels
        if lab.kind != "multilabel"
    ]
    if spec.categories:
        name = "future_genres" if spec.name.startswith("movielens") else "future_categories"
        tasks.append(Task(name, "multilabel", fut_cat))
    tasks.append(Task("next_items", "ranking"))
    return BenchData(spec, dm.split.copy(), history, future, seqs, tasks)


# ---------------------------------------------------------------------------------- representations
def pooled_representation(dm: UserDataModule) -> tuple[np.ndarray, float]:
    """Mean over every history slice of the parameter-free slice features.

    The sources fill mostly different columns of a slice feature (text, item codes, category
    histogram, values), so one mean keeps them apart at a quarter of a per-source concatenation's
    width, which keeps the probes fast.
    """
    from foundv2.nn.pooled import PooledSliceFeatures, mean_by_user

    d = dm.dims()
    net = PooledSliceFeatures(d["num_sources"], d["num_items"], d["num_categories"], d["text_dim"], d["tabular_dim"])
    out = np.zeros((len(dm.table), net.dim), np.float32)
    for batch in dm.predict_dataloader():
        s = net(batch)
        out[batch["row"].numpy()] = mean_by_user(s["feat"], s["slice_user"], batch["user_id"].shape[0]).numpy()
    return out, float(out.shape[1] * 4)


def token_representations(tokens_dir: Path, tokenizer_dir: Path | None, n_rows: int) -> dict:
    """``tokens_bag`` (counts of global token ids) and ``tokens_sum`` (summed code vectors per source)."""
    from data_modules.store import read_stage_output

    ds, meta = read_stage_output(tokens_dir)
    report = json.loads((tokens_dir / "report.json").read_text())
    bytes_per_user = float(report["storage"]["bytes_per_user"])
    ds = ds.with_format("numpy")
    vocab = int(meta["vocab_size"])
    S = len(meta["sources"])
    model = None
    if tokenizer_dir is not None and (tokenizer_dir / "config.json").exists():
        from foundv2.nn.mrqvae import MultiViewRQVAE

        model = MultiViewRQVAE.from_pretrained(tokenizer_dir).eval()
    rows, cols = [], []
    summed = None
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
    r = np.concatenate(rows)
    bag = sp.csr_matrix((np.ones(len(r), np.float32), (r, np.concatenate(cols))), shape=(n_rows, vocab))
    reps = {"tokens_bag": (bag, bytes_per_user)}
    if summed is not None:
        reps["tokens_sum"] = (summed.reshape(n_rows, -1), bytes_per_user)
    reps["_usage"] = np.asarray(bag.sum(0)).ravel()
    reps["_levels"] = meta["levels"]
    return reps


def embedding_representation(folder: Path, n_rows: int, column: str = "user_emb") -> tuple[np.ndarray, float]:
    """A per-user embedding column of a stage output (stage 1, stage 3, Q-Anchor)."""
    from data_modules.store import read_stage_output

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


# ---------------------------------------------------------------------------------- evaluation
def probe_all(X, data: BenchData, next_items: bool, probe_epochs: int, skip_tasks: tuple = (),
              probe_batch_size: int = 256) -> dict:
    results = {}
    for task in data.tasks:
        if task.name in skip_tasks:
            continue
        t0 = time.perf_counter()
        if task.kind == "ranking":
            if not next_items:
                continue
            # 256 users a step: a quarter of the optimiser steps of 64 for the same epochs
            res = fit_next_item_probe(X, data.history, data.future, data.split, epochs=probe_epochs,
                                      batch_size=probe_batch_size)
        else:
            res = fit_logistic_probe(X, task.y, data.split, task.kind)
        results[task.name] = {**{k: float(v) for k, v in res.items()}, "seconds": time.perf_counter() - t0}
    return results


def run_baselines(data: BenchData, names: list[str], sasrec_epochs: int, probe_epochs: int,
                  skip: tuple = ()) -> dict:
    out: dict[str, dict] = {}
    for name in names:
        if name in ("popularity", "ease", "itemknn", "sasrec") and "next_items" in skip:
            continue
        t0 = time.perf_counter()
        if name == "tfidf":
            X = B.tfidf_features(data.history, data.split)
            out[name] = probe_all(X, data, next_items=True, probe_epochs=probe_epochs, skip_tasks=skip)
            out[name]["bytes_per_user"] = float(
                data.history.nnz / data.history.shape[0] * 8
            )  # (id, weight) pairs
        elif name == "majority":
            out[name] = {
                t.name: {**B.majority(t.y, data.split, t.kind)[0]} for t in data.tasks if t.kind != "ranking"
            }
        elif name in ("popularity", "ease", "itemknn"):
            res, secs = getattr(B, name)(data.history, data.future, data.split)
            out[name] = {"next_items": {**res, "seconds": secs}}
        elif name == "sasrec":
            res, secs = B.sasrec(
                data.sequences,
                data.future,
                data.split,
                B.SASRecConfig(epochs=sasrec_epochs),
                history=data.history,
            )
            out[name] = {"next_items": {**res, "seconds": secs}}
        else:
            raise DataError(
                f"unknown baseline '{name}'; known: tfidf, majority, popularity, ease, itemknn, sasrec."
            )
        log.info("baseline %s done in %.1fs", name, time.perf_counter() - t0)
    return out


def _versions() -> dict:
    v = {}
    for lib in ("torch", "lightning", "torchmetrics", "datasets", "transformers", "scikit-learn", "numpy"):
        try:
            v[lib] = version(lib)
        except PackageNotFoundError:
            v[lib] = None
    return v


def run_bench(
    dm: UserDataModule,
    output_dir: str,
    tokens_dir: str | None = None,
    tokenizer_dir: str | None = None,
    embeddings: dict[str, str] | None = None,
    baselines: list[str] | None = None,
    representations: list[str] | None = None,
    sasrec_epochs: int = 15,
    probe_epochs: int = 30,
    seed: int = 0,
    skip_tasks: list[str] | None = None,
) -> dict:
    """Run the whole protocol; returns the bench.json dict.

    Args:
        dm: the data (its prepared cache is reused).
        output_dir: where bench.json, report.md, the plots and tb/ go.
        tokens_dir: a tokens dataset (TokenizerStage predict) for the token rows.
        tokenizer_dir: the tokenizer's export folder, to sum code vectors (``tokens_sum``).
        embeddings: name → a stage output folder with a ``user_emb`` column (e.g. stage 1).
        baselines: which baselines to train (default: all).
        representations: which built-in representations to probe (pooled, tokens_bag, tokens_sum).
        sasrec_epochs: SASRec's epoch budget (early-stopped on val).
        probe_epochs: the next-item probe's epoch budget (early-stopped on val).
        seed: seed of the probes.
        skip_tasks: tasks left out (a quick bench, e.g. ["next_items"]).
    """
    skip = tuple(skip_tasks or ())
    torch.manual_seed(seed)
    np.random.seed(seed)
    out_dir = Path(output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    dm.prepare_data()
    data = load_bench_data(dm)
    n_rows = len(data.split)
    reps: dict[str, tuple] = {}
    usage = None
    wanted = representations or ["pooled", "tokens_bag", "tokens_sum"]
    if "pooled" in wanted:
        reps["pooled"] = pooled_representation(dm)
    if tokens_dir:
        tok = token_representations(Path(tokens_dir), Path(tokenizer_dir) if tokenizer_dir else None, n_rows)
        usage = (tok.pop("_usage"), tok.pop("_levels"))
        reps.update({k: v for k, v in tok.items() if k in wanted})
    for name, folder in (embeddings or {}).items():
        reps[name] = embedding_representation(Path(folder), n_rows)
    results: dict[str, dict] = {}
    for name, (X, bytes_per_user) in reps.items():
        t0 = time.perf_counter()
        results[name] = probe_all(X, data, next_items=True, probe_epochs=probe_epochs, skip_tasks=skip)
        results[name]["bytes_per_user"] = bytes_per_user
        log.info("representation %s probed in %.1fs", name, time.perf_counter() - t0)
    all_baselines = ["tfidf", "majority", "popularity", "ease", "itemknn", "sasrec"]
    results.update(run_baselines(data, all_baselines if baselines is None else baselines, sasrec_epochs,
                                 probe_epochs, skip))
    bench = {
        "protocol": PROTOCOL,
        "dataset": dm.hparams.dataset,
        "split_sizes": {k: int((data.split == i).sum()) for i, k in enumerate(("train", "val", "test"))},
        "seed": seed,
        "split_seed": dm.hparams.split_seed,
        "num_items": int(data.history.shape[1]),
        "tasks": {t.name: t.kind for t in data.tasks if t.name not in skip},
        "versions": _versions(),
        "machine": {"cores": os.cpu_count(), "platform": platform.platform()},
        "seconds": time.perf_counter() - t_start,
        "results": results,
        "inputs": {"tokens_dir": tokens_dir, "tokenizer_dir": tokenizer_dir, "embeddings": embeddings or {}},
    }
    from foundv2.bench.report import write_report

    write_report(bench, out_dir, usage)
    return bench
