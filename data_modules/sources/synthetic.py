"""Deterministic synthetic users with planted signal, in the canonical schema.

This is the only data where we know the truth, so everything planted here must be recoverable.

**The world** (fixed by the seed): 18 categories named like film genres, and per source
(``payment``, ``item``, ``search``, ``app``) ``ITEMS_PER_CATEGORY`` items per category. Item ids
are *disjoint per source*: source ``s`` owns ids ``[s * ITEM_ID_STRIDE, (s + 1) * ITEM_ID_STRIDE)``
and item ``s * ITEM_ID_STRIDE + c * ITEMS_PER_CATEGORY + j`` belongs to category ``c``. Every
item has one fixed text (merchant name, product title, search query, app screen) built from the
category's keywords, so the number of distinct texts is bounded (``4 * 18 * ITEMS_PER_CATEGORY``)
however many users there are. Within a (source, category) the items form a ring (a fixed
permutation): the ring is the Markov chain users walk along.

**Users**: each user has one of six archetypes (:data:`ARCHETYPES`), the ``segment`` label.
The archetype sets the preferred categories (and those boosted on weekends), the weekday and
hour-of-day activity profile, the mix of sources, the popularity order of items inside a
category, the payment amounts and the churn base rate. Each user then draws personal latents
around the archetype: category weights (Dirichlet), source mix (Dirichlet), an activity level,
an activity *trend* over the period, a spending level and a loyalty (the chance of stepping
along the ring instead of jumping to a fresh item).

**Events**: timestamps over ``days`` days from :data:`EPOCH` (2024-01-01 00:00 UTC, a Monday);
a user's activity rises or falls linearly over the period with its trend. For each source a user
walks a Markov chain: an event either *jumps* (category from the user's weights, boosted by the
archetype's weekend categories on Saturday/Sunday; item by the archetype's popularity order) or
*steps* to the successor of the previous item on the ring (same category). So the future (the
last 20 % of events) is predictable from the history: the same categories, and next items that
follow the last ones.

**Labels** (users table): ``segment`` (the archetype, 6 classes); ``churn`` (binary, from the
archetype's base rate and the user's activity trend: falling activity churns more);
``spender`` (binary: the user's spending level, which sets its payment amounts, is above
:data:`SPENDER_LOG_AMOUNT`). Tabular inputs: ``age_norm`` (age, tied to the archetype) and
``region`` (integer code 0..9, weakly tied to the archetype). Future-category labels
(``future_genres`` style) are derived later from the future events' ``category``.

**Determinism and chunking**: users are generated in blocks of :data:`BLOCK_USERS` users; block
``b`` (user ids ``b * BLOCK_USERS + i``) is generated, vectorised, from a NumPy generator seeded
by ``(seed, b)``. Blocks are always generated whole (then cut at ``n_users``) and re-cut into the
requested chunks, so a user's events depend only on ``(seed, user_id)`` (and the generation
parameters ``days``, ``events_per_user``, ``empty_user_frac``), not on ``n_users`` nor on
``chunk_users``: the first 20k users of a 1M-user run are the 20k-user data set.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from data_modules.schema import DatasetSpec, LabelSpec

SYNTHETIC_SOURCES = ["payment", "item", "search", "app"]

CATEGORIES = [
    "action", "adventure", "animation", "children", "comedy", "crime", "documentary", "drama",
    "fantasy", "film-noir", "horror", "musical", "mystery", "romance", "sci-fi", "thriller", "war",
    "western",
]  # fmt: skip
# two keywords per category: the words item texts are made of
_KEYWORDS = {
    "action": ("explosion", "car chase"), "adventure": ("treasure", "jungle"),
    "animation": ("cartoon", "anime"), "children": ("kids", "fairy tale"),
    "comedy": ("stand-up", "sitcom"), "crime": ("heist", "detective"),
    "documentary": ("wildlife", "history"), "drama": ("family saga", "courtroom"),
    "fantasy": ("dragon", "wizard"), "film-noir": ("noir", "femme fatale"),
    "horror": ("ghost", "zombie"), "musical": ("broadway", "song and dance"),
    "mystery": ("whodunit", "puzzle"), "romance": ("love story", "wedding"),
    "sci-fi": ("spaceship", "robot"), "thriller": ("suspense", "spy"),
    "war": ("battle", "soldier"), "western": ("cowboy", "frontier"),
}  # fmt: skip

EPOCH = 1704067200  # 2024-01-01 00:00:00 UTC, a Monday: day d has weekday d % 7 (0 = Monday)
DAY_S = 86400
HOUR_S = 3600
WEEK_DAYS = 7
ITEMS_PER_CATEGORY = 16  # items per (source, category): 4 * 18 * 16 = 1152 items and texts
ITEM_ID_STRIDE = 10_000  # item ids of source s start at s * ITEM_ID_STRIDE (disjoint sources)
BLOCK_USERS = 1000  # users per RNG block: the unit of determinism
MIN_EVENTS = 5  # every non-empty user has at least this many events (history and future exist)
N_REGIONS = 10
SPENDER_LOG_AMOUNT = 3.5  # spender = user's log-amount level above this (amount ~ e^3.5 = 33)
_WORLD_SALT = 0x5EED  # separates the world's RNG stream from the blocks' streams
_SALT_BLOCK = 1


@dataclass(frozen=True)
class Archetype:
    """One user archetype: the planted profile that drives behaviour and labels."""

    name: str
    share: float  # fraction of users
    categories: tuple[str, ...]  # preferred categories
    weekend_categories: tuple[str, ...]  # boosted on Saturday and Sunday
    weekday_profile: tuple[float, ...]  # relative activity Monday..Sunday
    peak_hour: float  # hour of day of peak activity (UTC)
    hour_spread: float  # standard deviation of the hour, in hours
    source_mix: tuple[float, float, float, float]  # payment, item, search, app
    activity: float  # events multiplier
    log_amount: float  # mean log payment amount
    churn_logit: float  # base churn log-odds
    trend_mean: float  # mean activity trend (negative: fading user)
    age_mean: float
    home_region: int


ARCHETYPES: list[Archetype] = [
    Archetype("weekend_binger", 0.20, ("action", "adventure", "sci-fi", "fantasy"), ("horror", "thriller"),
              (0.5, 0.5, 0.5, 0.6, 1.0, 2.5, 2.5), 21.0, 2.5, (0.15, 0.45, 0.15, 0.25),
              1.0, 3.0, -1.0, 0.0, 27.0, 1),
    Archetype("commuter", 0.20, ("documentary", "drama", "crime", "mystery"), ("comedy", "romance"),
              (1.6, 1.6, 1.6, 1.6, 1.4, 0.3, 0.3), 8.0, 1.5, (0.25, 0.20, 0.30, 0.25),
              1.2, 3.4, -2.0, 0.3, 40.0, 3),
    Archetype("family_planner", 0.15, ("animation", "children", "comedy", "musical"), ("adventure", "fantasy"),
              (0.6, 1.8, 1.8, 0.6, 0.6, 0.8, 0.8), 18.0, 2.0, (0.35, 0.30, 0.15, 0.20),
              0.9, 3.9, -1.5, 0.0, 38.0, 5),
    Archetype("night_owl", 0.15, ("horror", "thriller", "film-noir", "sci-fi"), ("crime", "mystery"),
              (1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0), 1.0, 2.0, (0.10, 0.30, 0.20, 0.40),
              1.3, 2.8, 0.0, -0.5, 24.0, 7),
    Archetype("bargain_hunter", 0.15, ("comedy", "romance", "drama", "western"), ("musical", "war"),
              (2.0, 0.6, 0.6, 0.6, 2.0, 0.8, 0.8), 12.0, 3.0, (0.45, 0.15, 0.30, 0.10),
              0.8, 2.5, -0.5, -0.2, 52.0, 0),
    Archetype("explorer", 0.15, ("war", "western", "documentary", "adventure"), ("animation", "mystery"),
              (1.0, 1.0, 1.3, 1.3, 1.0, 0.7, 0.7), 15.0, 4.0, (0.20, 0.30, 0.35, 0.15),
              1.0, 3.2, -1.0, 0.2, 33.0, 9),
]  # fmt: skip

# Behaviour constants (what the latents are drawn from)
_PREF_WEIGHT = 6.0  # weight of a preferred category relative to 1 for the others
_WEEKEND_BOOST = 4.0  # multiplier of a weekend category on Saturday/Sunday
_CAT_CONCENTRATION = 8.0  # Dirichlet concentration of a user's category weights (sum of alphas)
_SOURCE_CONCENTRATION = 20.0  # Dirichlet concentration of a user's source mix
_ACTIVITY_SIGMA = 0.4  # log-normal spread of a user's activity level
_TREND_SD = 0.6  # spread of the activity trend around the archetype's mean
_TREND_MAX = 1.8  # |trend| bound: the activity density 1 + trend * (x - 1/2) stays positive
_CHURN_TREND_COEF = 2.0  # churn log-odds fall by this per unit of trend
_LOG_AMOUNT_SD = 0.5  # spread of a user's spending level around the archetype's
_AMOUNT_NOISE_SD = 0.4  # spread of single payment amounts around the user's level
_LOYALTY_BETA = (3.0, 2.0)  # Beta(a, b) of the chance to step along the ring (mean 0.6)
_ZIPF_EXPONENT = 1.0  # item popularity within a category: p(rank r) ~ 1 / (r + 1) ** exponent
_AGE_SD = 8.0
_AGE_CENTER, _AGE_SCALE = 40.0, 15.0  # age_norm = (age - 40) / 15
_AGE_RANGE = (18.0, 80.0)
_HOME_REGION_P = 0.4  # chance a user lives in the archetype's home region (else uniform)

SEGMENT_NAMES = [a.name for a in ARCHETYPES]


def synthetic_spec(name: str = "synthetic") -> DatasetSpec:
    """The DatasetSpec of the synthetic data: 4 sources, 2 tabular inputs, 3 labels, 18 categories."""
    return DatasetSpec(
        name=name,
        sources=list(SYNTHETIC_SOURCES),
        tabular_inputs=["age_norm", "region"],
        labels=[
            LabelSpec("segment", "multiclass", num_classes=len(ARCHETYPES), class_names=list(SEGMENT_NAMES)),
            LabelSpec("churn", "binary", num_classes=2, class_names=["stays", "churns"]),
            LabelSpec("spender", "binary", num_classes=2, class_names=["low", "high"]),
        ],
        categories=list(CATEGORIES),
        description=(
            "Deterministic synthetic users: 6 archetypes drive category preferences, weekly and daily "
            "activity, source mix, payment amounts and churn; items follow a per-source Markov chain "
            "so the future is predictable from the history."
        ),
    )


# --------------------------------------------------------------------------------------------
# The world: item texts, rings, popularity orders


def _item_texts() -> list[str]:
    """Text of every item, indexed by ``source * n_cat * ITEMS_PER_CATEGORY + cat * ITEMS_PER_CATEGORY + j``."""
    merchant_adj = ["Golden", "Corner", "Royal", "Urban", "Lucky", "Blue", "Happy", "Grand"]
    merchant_kind = ["Store", "Shop"]
    title_adj = ["The Last", "Return of the", "Midnight", "Secret", "Little", "Lost", "Crimson", "Endless"]
    title_kind = ["", "II"]
    queries = [
        "best {k} movies", "{k} tickets near me", "cheap {k} deals", "new {k} releases",
        "{k} for beginners", "top rated {k}", "{k} reviews", "watch {k} online",
        "{k} soundtrack", "{k} box set", "classic {k}", "{k} gift ideas",
        "{k} trivia", "{k} streaming tonight", "{k} collector edition", "{k} fan club",
    ]  # fmt: skip
    screens = ["feed", "clips", "top charts", "new arrivals", "favourites", "live", "trailers", "community"]
    texts = []
    for source in SYNTHETIC_SOURCES:
        for cat in CATEGORIES:
            kws = _KEYWORDS[cat]
            for j in range(ITEMS_PER_CATEGORY):
                kw = kws[j % len(kws)]
                half = j // len(merchant_adj)  # 0 or 1: second half of the items
                if source == "payment":
                    t = f"{merchant_adj[j % len(merchant_adj)]} {kw.title()} {merchant_kind[half]}"
                elif source == "item":
                    t = f"{title_adj[j % len(title_adj)]} {kw.title()} {title_kind[half]}".strip()
                    t += f" ({cat})"
                elif source == "search":
                    t = queries[j].format(k=kw)
                else:
                    t = f"{cat} {screens[j % len(screens)]}" + (f" - {kw}" if half else "")
                texts.append(t)
    return texts


ITEM_TEXTS = np.array(_item_texts(), dtype=object)
_N_SRC, _N_CAT, _N_ARCH = len(SYNTHETIC_SOURCES), len(CATEGORIES), len(ARCHETYPES)


@dataclass
class _World:
    ring: np.ndarray  # [src, cat, pos] -> local item index j (the Markov chain's order)
    ring_pos: np.ndarray  # [src, cat, j] -> position on the ring
    popular: np.ndarray  # [arch, src, cat, rank] -> ring position of the rank-th favourite item
    cat_w: np.ndarray  # [arch, cat] archetype category weights (sum 1)
    weekend_boost: np.ndarray  # [arch, cat]
    day_cum: np.ndarray  # [arch, 7] cumulative weekday distribution
    rank_cum: np.ndarray  # [rank] cumulative popularity distribution


def _world(seed: int) -> _World:
    rng = np.random.default_rng([seed, _WORLD_SALT])
    ring = np.stack(
        [np.stack([rng.permutation(ITEMS_PER_CATEGORY) for _ in range(_N_CAT)]) for _ in range(_N_SRC)]
    )
    ring_pos = np.argsort(ring, axis=-1)
    popular = rng.permuted(
        np.broadcast_to(np.arange(ITEMS_PER_CATEGORY), (_N_ARCH, _N_SRC, _N_CAT, ITEMS_PER_CATEGORY)).copy(),
        axis=-1,
    )
    cat_index = {c: i for i, c in enumerate(CATEGORIES)}
    cat_w = np.ones((_N_ARCH, _N_CAT))
    boost = np.ones((_N_ARCH, _N_CAT))
    for a, arch in enumerate(ARCHETYPES):
        cat_w[a, [cat_index[c] for c in arch.categories]] = _PREF_WEIGHT
        boost[a, [cat_index[c] for c in arch.weekend_categories]] = _WEEKEND_BOOST
    cat_w /= cat_w.sum(1, keepdims=True)
    days = np.array([a.weekday_profile for a in ARCHETYPES])
    rank_p = 1.0 / (np.arange(ITEMS_PER_CATEGORY) + 1.0) ** _ZIPF_EXPONENT
    return _World(
        ring=ring,
        ring_pos=ring_pos,
        popular=popular,
        cat_w=cat_w,
        weekend_boost=boost,
        day_cum=np.cumsum(days / days.sum(1, keepdims=True), axis=1),
        rank_cum=np.cumsum(rank_p / rank_p.sum()),
    )


def _sample_rows(cum: np.ndarray, rows: np.ndarray, u: np.ndarray) -> np.ndarray:
    """Categorical draws: event i takes category k with probability of row ``rows[i]`` of ``cum``.

    ``cum`` [R, k] holds cumulative probabilities (each row ends at 1), ``u`` uniforms in [0, 1).
    Row r is shifted by r so one sorted array serves every row (no [n, k] matrix is built).
    """
    k = cum.shape[1]
    table = cum / cum[:, -1:]
    table[:, -1] = 1.0  # exact end: row r spans [r, r + 1)
    flat = (table + np.arange(len(cum))[:, None]).ravel()
    pos = np.searchsorted(flat, rows + u, side="right") - rows * k
    return np.clip(pos, 0, k - 1)


def _dirichlet_rows(rng: np.random.Generator, alpha: np.ndarray) -> np.ndarray:
    """Vectorised Dirichlet draws, one per row of ``alpha`` [n, k]."""
    g = rng.gamma(alpha)
    return g / np.maximum(g.sum(1, keepdims=True), 1e-30)  # guard: all-zero gammas are possible in fp


# --------------------------------------------------------------------------------------------
# One block


def _block(
    world: _World, seed: int, b: int, days: int, events_per_user: float, empty_user_frac: float
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Generate block ``b`` (BLOCK_USERS users) as column arrays, events sorted by (user, time)."""
    rng = np.random.default_rng([seed, _SALT_BLOCK, b])
    B = BLOCK_USERS
    arr = ARCHETYPES
    share = np.array([a.share for a in arr])
    arch = rng.choice(_N_ARCH, size=B, p=share / share.sum())

    # user latents
    age = np.clip(np.array([a.age_mean for a in arr])[arch] + rng.normal(0, _AGE_SD, B), *_AGE_RANGE)
    home = np.array([a.home_region for a in arr])[arch]
    region = np.where(rng.random(B) < _HOME_REGION_P, home, rng.integers(0, N_REGIONS, B))
    trend = np.clip(
        np.array([a.trend_mean for a in arr])[arch] + rng.normal(0, _TREND_SD, B), -_TREND_MAX, _TREND_MAX
    )
    log_amount = np.array([a.log_amount for a in arr])[arch] + rng.normal(0, _LOG_AMOUNT_SD, B)
    loyalty = rng.beta(*_LOYALTY_BETA, size=B)
    cat_w = _dirichlet_rows(rng, world.cat_w[arch] * _CAT_CONCENTRATION)
    src_mix = _dirichlet_rows(rng, np.array([a.source_mix for a in arr])[arch] * _SOURCE_CONCENTRATION)
    # mean-one log-normal activity (exp(mu + s^2/2) = 1)
    level = np.array([a.activity for a in arr])[arch] * rng.lognormal(
        -(_ACTIVITY_SIGMA**2) / 2, _ACTIVITY_SIGMA, B
    )
    n_ev = np.maximum(rng.poisson(events_per_user * level), MIN_EVENTS)
    empty = rng.random(B) < empty_user_frac
    n_ev = np.where(empty, 0, n_ev)

    churn_logit = np.array([a.churn_logit for a in arr])[arch] - _CHURN_TREND_COEF * trend
    churn = (rng.random(B) < 1.0 / (1.0 + np.exp(-churn_logit))).astype(np.int64)
    spender = (log_amount > SPENDER_LOG_AMOUNT).astype(np.int64)

    users = {
        "user_id": b * B + np.arange(B, dtype=np.int64),
        "age_norm": ((age - _AGE_CENTER) / _AGE_SCALE).astype(np.float32),
        "region": region.astype(np.int64),
        "segment": arch.astype(np.int64),
        "churn": churn,
        "spender": spender,
    }

    # events: one row per event, u = the user's index in the block
    u = np.repeat(np.arange(B), n_ev)
    E = len(u)
    ua = arch[u]
    # time: week from the trend density 1 + trend * (x - 1/2) on [0, 1] (closed-form inverse CDF),
    # weekday from the archetype's profile, hour from its daily peak
    tr = trend[u]
    r = rng.random(E)
    x = 2 * r / ((1 - tr / 2) + np.sqrt((1 - tr / 2) ** 2 + 2 * tr * r))
    n_weeks = -(-days // WEEK_DAYS)
    week = np.minimum((x * n_weeks).astype(np.int64), n_weeks - 1)
    wd = _sample_rows(world.day_cum, ua, rng.random(E))
    day = week * WEEK_DAYS + wd
    day = np.where(day >= days, day - WEEK_DAYS, day)  # partial last week: fold back, same weekday
    peak = np.array([a.peak_hour for a in arr])[ua]
    spread = np.array([a.hour_spread for a in arr])[ua]
    hour = np.floor(peak + rng.normal(0, 1, E) * spread).astype(np.int64) % 24
    ts = EPOCH + day * DAY_S + hour * HOUR_S + rng.integers(0, HOUR_S, E)
    src = _sample_rows(np.cumsum(src_mix, 1), u, rng.random(E))

    # Markov chain per (user, source) in time order; sort keys packed in one int64
    t_bits = int(days * DAY_S).bit_length()
    order = np.argsort(((u * _N_SRC + src) << t_bits) + (ts - EPOCH), kind="stable")
    u_o, src_o, wd_o, ua_o = u[order], src[order], wd[order], ua[order]
    start = np.ones(E, dtype=bool)
    start[1:] = (u_o[1:] != u_o[:-1]) | (src_o[1:] != src_o[:-1])
    jump = start | (rng.random(E) >= loyalty[u_o])
    ji = np.flatnonzero(jump)
    # category weights per (user, weekend?): row 2 * user + 1 is the weekend (Sat = 5, Sun = 6) row
    w = np.stack([cat_w, cat_w * world.weekend_boost[arch]], axis=1).reshape(2 * B, _N_CAT)
    cat_j = _sample_rows(np.cumsum(w, 1), 2 * u_o[ji] + (wd_o[ji] >= 5), rng.random(len(ji)))
    rank = np.minimum(np.searchsorted(world.rank_cum, rng.random(len(ji))), ITEMS_PER_CATEGORY - 1)
    pos_j = world.popular[ua_o[ji], src_o[ji], cat_j, rank]
    idx = np.arange(E)
    last = np.maximum.accumulate(np.where(jump, idx, 0))  # index of the latest jump
    slot = np.cumsum(jump) - 1  # which jump that is
    cat_o = cat_j[slot]
    pos_o = (pos_j[slot] + (idx - last)) % ITEMS_PER_CATEGORY
    local_o = world.ring[src_o, cat_o, pos_o]

    # back to (user, time) order
    inv = np.empty(E, dtype=np.int64)
    inv[order] = idx
    cat = cat_o[inv]
    local = local_o[inv]
    item_index = (src * _N_CAT + cat) * ITEMS_PER_CATEGORY + local
    item_id = src * ITEM_ID_STRIDE + cat * ITEMS_PER_CATEGORY + local

    # values, by source
    value = np.zeros(E)
    is_pay, is_item, is_search, is_app = (src == k for k in range(_N_SRC))
    value[is_pay] = np.round(np.exp(log_amount[u[is_pay]] + rng.normal(0, _AMOUNT_NOISE_SD, is_pay.sum())), 2)
    # rating 1..5: higher for the user's stronger categories
    affinity = cat_w[u[is_item], cat[is_item]] * _N_CAT  # 1 = average category
    value[is_item] = np.clip(np.round(3.0 + np.log(affinity) + rng.normal(0, 0.7, is_item.sum())), 1, 5)
    value[is_search] = rng.poisson(1.0, is_search.sum())  # results clicked
    value[is_app] = np.round(rng.lognormal(np.log(5.0), 0.7, is_app.sum()), 1)  # minutes, median 5

    # (user, time, source) order; the source takes the 2 low bits (4 sources)
    final = np.argsort((((u << t_bits) + (ts - EPOCH)) << 2) + src, kind="stable")
    events = {
        "user_id": (b * B + u)[final].astype(np.int64),
        "source": src[final].astype(np.int8),
        "timestamp": ts[final].astype(np.int64),
        "item_id": item_id[final].astype(np.int64),
        "text": item_index[final].astype(np.int32),
        "value": value[final].astype(np.float32),
        "category": cat[final].astype(np.int8),
    }
    return events, users


_SOURCE_NAMES = np.array(SYNTHETIC_SOURCES, dtype=object)
_CATEGORY_NAMES = np.array(CATEGORIES, dtype=object)


def _frames(ev: dict[str, np.ndarray], us: dict[str, np.ndarray]) -> tuple[pd.DataFrame, pd.DataFrame]:
    events = pd.DataFrame(
        {
            "user_id": ev["user_id"],
            "source": _SOURCE_NAMES[ev["source"]],
            "timestamp": ev["timestamp"],
            "item_id": ev["item_id"],
            "text": ITEM_TEXTS[ev["text"]],
            "value": ev["value"],
            "category": _CATEGORY_NAMES[ev["category"]],
        }
    )
    return events, pd.DataFrame(us)


def _cut(cols: dict[str, np.ndarray], n: int) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    return {k: v[:n] for k, v in cols.items()}, {k: v[n:] for k, v in cols.items()}


def _check_args(n_users: int, days: int, empty_user_frac: float) -> None:
    if n_users < 0:
        raise ValueError(f"n_users must be >= 0, got {n_users}")
    if days < WEEK_DAYS:
        raise ValueError(f"days must be >= {WEEK_DAYS} (weekly periodicity is planted), got {days}")
    if not 0.0 <= empty_user_frac <= 1.0:
        raise ValueError(f"empty_user_frac must be in [0, 1], got {empty_user_frac}")


def synthetic_range(
    lo: int,
    hi: int,
    seed: int = 0,
    days: int = 56,
    events_per_user: float = 40.0,
    empty_user_frac: float = 0.0,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Users ``lo .. hi - 1`` as ``(events_df, users_df)`` in the canonical schema, events sorted by
    (user_id, timestamp): the blocks that cover the range, generated whole and cut. Any process can
    generate any range on its own (preparation shares ranges out over ranks); the users are the
    same as in every other range or chunking (see the module docstring)."""
    _check_args(hi, days, empty_user_frac)
    world = _world(seed)
    evs, uss = [], []
    for b in range(lo // BLOCK_USERS, -(-hi // BLOCK_USERS)):
        ev, us = _block(world, seed, b, days, events_per_user, empty_user_frac)
        evs.append(ev)
        uss.append(us)
    if not evs:
        ev, us = _block(world, seed, 0, days, 1.0, 0.0)
        return _frames(_cut(ev, 0)[0], _cut(us, 0)[0])
    ev = {k: np.concatenate([e[k] for e in evs]) for k in evs[0]}
    us = {k: np.concatenate([x[k] for x in uss]) for k in uss[0]}
    e0, e1 = np.searchsorted(ev["user_id"], [lo, hi])
    u0, u1 = np.searchsorted(us["user_id"], [lo, hi])
    return _frames({k: v[e0:e1] for k, v in ev.items()}, {k: v[u0:u1] for k, v in us.items()})


def generate_synthetic(
    n_users: int,
    seed: int = 0,
    chunk_users: int = 10000,
    days: int = 56,
    events_per_user: float = 40.0,
    empty_user_frac: float = 0.0,
) -> Iterator[tuple[pd.DataFrame, pd.DataFrame]]:
    """Yield ``(events_df, users_df)`` chunks of complete users, in the canonical schema.

    Chunk ``k`` holds users ``k * chunk_users .. min((k + 1) * chunk_users, n_users) - 1``; events
    are sorted by (user_id, timestamp). Memory stays bounded by one chunk plus the blocks that
    cover it, so millions of users stream through. A user's data depends only on (seed, user_id)
    and the generation parameters, never on ``n_users`` or ``chunk_users`` (see the module
    docstring).

    Args:
        n_users: number of users.
        seed: the seed of the world and of every block.
        chunk_users: users per yielded chunk.
        days: length of the period in days (>= 7), starting at :data:`EPOCH`.
        events_per_user: about the mean number of events per user (each non-empty user has at
            least ``MIN_EVENTS``).
        empty_user_frac: fraction of users with no events at all (they are in the users table).
    """
    _check_args(n_users, days, empty_user_frac)
    if chunk_users < 1:
        raise ValueError(f"n_users must be >= 0 and chunk_users >= 1, got {n_users}, {chunk_users}")
    for lo in range(0, n_users, chunk_users):
        yield synthetic_range(lo, min(lo + chunk_users, n_users), seed, days, events_per_user, empty_user_frac)


def load_synthetic(n_users: int, seed: int = 0, **kw) -> tuple[pd.DataFrame, pd.DataFrame]:
    """All chunks of :func:`generate_synthetic` concatenated: ``(events_df, users_df)``.

    For small data sets (tests, quick runs); large ones should stream the chunks instead.
    """
    parts = list(generate_synthetic(n_users, seed=seed, **kw))
    if not parts:  # n_users == 0: empty frames with the right columns and dtypes
        ev, us = _block(_world(seed), seed, 0, max(kw.get("days", 56), WEEK_DAYS), 1.0, 0.0)
        return _frames(_cut(ev, 0)[0], _cut(us, 0)[0])
    events = pd.concat([p[0] for p in parts], ignore_index=True)
    users = pd.concat([p[1] for p in parts], ignore_index=True)
    return events, users


def write_synthetic_files(folder: str | Path, n_users: int, n_files: int = 12, seed: int = 0,
                          chunk_users: int = 10_000, **kw) -> tuple[list[Path], Path]:
    """The synthetic users as a user's own files would hold them: a folder ``events/`` of
    ``n_files`` Parquet files in which every user's events are spread over every file (event ``i``
    of the data set goes to file ``i % n_files``) and a ``users.parquet`` beside it; generated and written one range of
    ``chunk_users`` users at a time (one row group per file and range), so memory stays that of one
    range. Returns (events files, users file). ``kw``: :func:`synthetic_range`'s generation
    arguments."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder = Path(folder)
    (folder / "events").mkdir(parents=True, exist_ok=True)
    paths = [folder / "events" / f"events-{k:03d}.parquet" for k in range(n_files)]
    users_path = folder / "users.parquet"
    writers: list = [None] * n_files
    users_writer = None
    done = 0
    try:
        for lo in range(0, n_users, chunk_users):
            events, users = synthetic_range(lo, min(lo + chunk_users, n_users), seed, **kw)
            table = pa.Table.from_pandas(events, preserve_index=False)
            which = (np.arange(done, done + len(events)) % n_files)
            done += len(events)
            for k in range(n_files):
                part = table.filter(pa.array(which == k))
                if writers[k] is None:
                    writers[k] = pq.ParquetWriter(paths[k], part.schema)
                writers[k].write_table(part)
            ut = pa.Table.from_pandas(users, preserve_index=False)
            if users_writer is None:
                users_writer = pq.ParquetWriter(users_path, ut.schema)
            users_writer.write_table(ut)
    finally:
        for w in [*writers, users_writer]:
            if w is not None:
                w.close()
    return paths, users_path
