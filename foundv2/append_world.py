"""A small synthetic world for appending windows: the base history and the new days as files,
the data and stage configs over them, and tiny stage-1 and tokenizer models. The append tests and
``benchmarks/bench_alignment.py`` (its append figures) build their worlds from it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import yaml

from data_modules.sources.synthetic import CATEGORIES, EPOCH, SYNTHETIC_SOURCES, load_synthetic

DAY = 86_400
LABELS = [{"name": "segment", "kind": "multiclass", "num_classes": 6}, {"name": "churn", "kind": "binary", "num_classes": 2},
          {"name": "spender", "kind": "binary", "num_classes": 2}]

def write_split_events(folder: Path, n_users: int, days: int, new_days: int = 1, new_share: float = 1.0,
                       seed: int = 0, events_per_user: float = 24.0) -> dict[str, Path]:
    """Synthetic users' first ``days`` days as the base history (``base.csv``), and ``new.csv``:
    for a ``new_share`` of the users (all with history), ``new_days`` more days, each holding
    copies of two of the user's earlier events (same source, item, text, value, category) at the
    same hour. Reusing the user's own items keeps the prepared item and text tables of
    ``full.csv`` (base + new) those of the base, so a full re-tokenize is comparable bit for bit."""
    folder.mkdir(parents=True, exist_ok=True)
    ev, users = load_synthetic(n_users, seed=seed, days=days, events_per_user=events_per_user)
    rng = np.random.default_rng(seed)
    active = ev["user_id"].unique()
    chosen = active[rng.random(len(active)) < new_share]
    new = []
    by_user = ev.groupby("user_id").indices
    for u in chosen:
        rows = ev.iloc[by_user[u]]
        for k in range(new_days):
            pick = rows.iloc[rng.choice(len(rows), size=min(2, len(rows)), replace=False)].copy()
            pick["timestamp"] = EPOCH + (days + k) * DAY + pick["timestamp"] % DAY
            new.append(pick)
    new = pd.concat(new, ignore_index=True).sort_values(["user_id", "timestamp"], kind="stable")
    paths = {name: folder / f"{name}.csv" for name in ("base", "new", "full", "users")}
    ev.to_csv(paths["base"], index=False)
    new.to_csv(paths["new"], index=False)
    pd.concat([ev, new]).sort_values(["user_id", "timestamp"], kind="stable").to_csv(paths["full"], index=False)
    users.to_csv(paths["users"], index=False)
    return paths


def data_config(path: Path, events: Path, users: Path, cache: Path, **kw) -> Path:
    data = {"dataset": "files", "loader_args": {"events": str(events), "users": str(users),
                                               "sources": list(SYNTHETIC_SOURCES),
                                               "tabular_inputs": ["age_norm", "region"], "labels": LABELS,
                                               "categories": list(CATEGORIES)},
            "window_mode": "day", "future_frac": 0.0, "text_encoder": "hashing", "cache_dir": str(cache),
            "batch_size": 16, "max_windows": 32, "progress": False,
            # calendar features are framed by the data set's span, which a re-prepare of base + new
            # re-frames (changing every window's features): off, so a full re-tokenize is comparable
            "calendar": False, **kw}
    path.write_text(yaml.safe_dump({"data": data}))
    return path


def stage_config(path: Path, root: Path, model: dict, max_epochs: int = 1, seed: int = 0, **trainer) -> Path:
    cfg = {"seed_everything": seed,
           "trainer": {"accelerator": "cpu", "devices": 1, "max_epochs": max_epochs, "logger": False,
                       "default_root_dir": str(root), "enable_progress_bar": False, "limit_val_batches": 0,
                       "num_sanity_val_steps": 0, **trainer},
           "model": model}
    path.write_text(yaml.safe_dump(cfg))
    return path


QFORMER = {"class_path": "foundv2.stages.qformer.QFormerStage",
           "init_args": {"qformer": {"dim": 16, "num_queries": 2, "num_layers": 2, "num_heads": 2}}}


def tokenizer_model(export: Path) -> dict:
    return {"class_path": "foundv2.stages.tokenizer.TokenizerStage",
            "init_args": {"quantizer": {"n_shared_levels": 2, "n_specific_levels": 1, "shared_codes": 16,
                                        "specific_codes": 8, "kmeans_buffer": 256, "respawn_every": 10},
                          "rqvae": {"code_dim": 8, "hidden": [32]}, "export_dir": str(export)}}
