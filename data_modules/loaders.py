"""The data-set registry: a name and its arguments → a spec and chunks of complete users."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

import pandas as pd

from data_modules.schema import DataError, DatasetSpec

DATASETS = ("synthetic", "movielens-1m", "movielens-100k", "files")


class Chunk(NamedTuple):
    """A piece of a data set holding every event of its users (the prepare pass is chunked)."""

    events: pd.DataFrame
    users: pd.DataFrame | None
    where: str  # the events file(s) or the loader, for error messages
    users_where: str = ""  # the users file, for error messages about the users table
    timestamp_unit: str = "s"  # the unit of an integer timestamp column


# MovieLens: a rating is the moment; its title and genre views follow it into history or future
PRIMARY_SOURCE = {"movielens-1m": "rating", "movielens-100k": "rating"}


def _split_by_users(whole: Chunk, chunk_users: int) -> Iterator[Chunk]:
    """Cut one big table into chunks of complete users (the prepare pass is chunked)."""
    events, users = whole.events, whole.users
    if users is None or len(users) <= chunk_users or "user_id" not in users.columns:
        yield whole
        return
    ids = pd.to_numeric(users["user_id"], errors="coerce")
    ev_ids = pd.to_numeric(events["user_id"], errors="coerce") if "user_id" in events.columns else None
    orphans = ~ev_ids.isin(ids) if ev_ids is not None else None  # users missing from the users table:
    for start in range(0, len(users), chunk_users):                # in the first chunk, which refuses them
        part = users.iloc[start:start + chunk_users]
        sel = ids.iloc[start:start + chunk_users]
        ev = events[ev_ids.isin(sel) | (orphans if start == 0 else False)] if ev_ids is not None else events
        yield whole._replace(events=ev, users=part)


def open_dataset(dataset: str, loader_args: dict | None = None) -> tuple[DatasetSpec, Iterator[Chunk], str | None]:
    """Return (spec, chunk iterator, primary source) for a registered data set."""
    args = dict(loader_args or {})
    if dataset == "synthetic":
        from data_modules.sources.synthetic import generate_synthetic, synthetic_spec

        n_users = int(args.pop("n_users", 2000))
        spec = synthetic_spec()
        gen = generate_synthetic(n_users, **args)
        chunks = (Chunk(ev, us, f"synthetic chunk {k}", f"synthetic chunk {k} (users)")
                  for k, (ev, us) in enumerate(gen))
        return spec, chunks, None
    if dataset in ("movielens-1m", "movielens-100k"):
        from data_modules.sources.movielens import load_movielens

        if args:
            raise DataError(f"{dataset} takes no loader arguments, got {sorted(args)}.")
        spec, events, users = load_movielens(dataset)
        return spec, iter([Chunk(events, users, dataset, f"{dataset} (users)")]), PRIMARY_SOURCE[dataset]
    if dataset == "files":
        from data_modules.sources.files import load_files

        primary = args.pop("primary_source", None)
        unit = str(args.pop("timestamp_unit", "s"))
        try:
            spec, frames, users, users_path = load_files(**args)
        except TypeError as err:
            raise DataError(f"files loader: bad arguments ({err}); see the README's own-data example.") from err
        events = pd.concat([f for f, _ in frames], ignore_index=True) if len(frames) > 1 else frames[0][0]
        where = ", ".join(p for _, p in frames)
        whole = Chunk(events, users, where, users_path, unit)
        return spec, _split_by_users(whole, chunk_users=50_000), primary
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
