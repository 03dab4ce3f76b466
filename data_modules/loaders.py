"""The data-set registry: a name and its arguments → a spec and chunks of complete users."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pandas as pd

from data_modules.schema import DataError, DatasetSpec

DATASETS = ("synthetic", "movielens-1m", "movielens-100k", "files")
Chunk = tuple[pd.DataFrame, pd.DataFrame | None, str]  # events, users, where (for error messages)

# MovieLens: a rating is the moment; its title and genre views follow it into history or future
PRIMARY_SOURCE = {"movielens-1m": "rating", "movielens-100k": "rating"}


def _split_by_users(events: pd.DataFrame, users: pd.DataFrame | None, where: str,
                    chunk_users: int) -> Iterator[Chunk]:
    """Cut one big table into chunks of complete users (the prepare pass is chunked)."""
    if users is None or len(users) <= chunk_users or "user_id" not in users.columns:
        yield events, users, where
        return
    ids = pd.to_numeric(users["user_id"], errors="coerce")
    ev_ids = pd.to_numeric(events["user_id"], errors="coerce") if "user_id" in events.columns else None
    for start in range(0, len(users), chunk_users):
        part = users.iloc[start:start + chunk_users]
        sel = ids.iloc[start:start + chunk_users]
        ev = events[ev_ids.isin(sel)] if ev_ids is not None else events
        yield ev, part, where


def open_dataset(dataset: str, loader_args: dict | None = None) -> tuple[DatasetSpec, Iterator[Chunk], str | None]:
    """Return (spec, chunk iterator, primary source) for a registered data set."""
    args = dict(loader_args or {})
    if dataset == "synthetic":
        from data_modules.sources.synthetic import generate_synthetic, synthetic_spec

        n_users = int(args.pop("n_users", 2000))
        spec = synthetic_spec()
        gen = generate_synthetic(n_users, **args)
        chunks = ((ev, us, f"synthetic chunk {k}") for k, (ev, us) in enumerate(gen))
        return spec, chunks, None
    if dataset in ("movielens-1m", "movielens-100k"):
        from data_modules.sources.movielens import load_movielens

        if args:
            raise DataError(f"{dataset} takes no loader arguments, got {sorted(args)}.")
        spec, events, users = load_movielens(dataset)
        return spec, iter([(events, users, dataset)]), PRIMARY_SOURCE[dataset]
    if dataset == "files":
        from data_modules.sources.files import load_files

        primary = args.pop("primary_source", None)
        try:
            spec, frames, users, users_path = load_files(**args)
        except TypeError as err:
            raise DataError(f"files loader: bad arguments ({err}); see the README's own-data example.") from err
        events = pd.concat([f for f, _ in frames], ignore_index=True) if len(frames) > 1 else frames[0][0]
        where = ", ".join(p for _, p in frames)
        return spec, _split_by_users(events, users, where, chunk_users=50_000), primary
    raise DataError(f"unknown data set '{dataset}'; known: {list(DATASETS)}.")


def files_fingerprint(loader_args: dict) -> dict:
    """Size and mtime of the user's files, so that an edited file invalidates the cache."""
    out = {}
    paths = loader_args.get("events", [])
    paths = [paths] if isinstance(paths, str) else list(paths)
    if loader_args.get("users"):
        paths.append(loader_args["users"])
    for p in paths:
        st = Path(p).stat() if Path(p).exists() else None
        out[str(p)] = (st.st_size, st.st_mtime_ns) if st else None
    return out
