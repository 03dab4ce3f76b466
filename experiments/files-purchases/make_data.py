"""Write the item-free example: a purchases-only table (dates and amounts, no item ids, no text).

Run:  python experiments/files-purchases/make_data.py      (rewrites purchases.csv and customers.csv here)

Generated, not taken from any real data set. Each customer signs up on a day of 2023 (their
first purchase), stays active for a while (a few days to the whole year) and buys at a personal
rate and spending level, mostly in the daytime. The customers table holds one profile input
(``age``) and three labels, written as class names (the data config declares ``class_names``):

- ``cohort``: ``early`` / ``late``, the first purchase in the first or second half of the year
  (a signup cohort: only absolute time tells them apart);
- ``lifecycle``: ``active`` / ``lapsed``, no purchase in the last 90 days of the year (a
  lifecycle stage);
- ``spender``: ``low`` / ``high``, the customer's spending level above the median.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

HERE = Path(__file__).resolve().parent
START = pd.Timestamp("2023-01-02")  # a Monday
DAYS = 364
LAPSED_AFTER = 90  # days without a purchase before the end of the log


def purchases(n_users: int = 2000, seed: int = 0) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(purchases, customers) of ``n_users`` customers: the example's two tables."""
    rng = np.random.default_rng(seed)
    rows, customers = [], []
    for u in range(1, n_users + 1):
        signup = rng.uniform(0, DAYS - 7)
        end = min(signup + 3 + rng.exponential(150), DAYS)
        n = 2 + rng.poisson((end - signup) / rng.uniform(8, 30))
        days = np.sort(np.concatenate([[signup], rng.uniform(signup, end, n - 1)]))
        hours = np.clip(rng.normal(14, 3.5, n), 0, 23.99)
        level = rng.lognormal(3.2, 0.6)
        amounts = np.round(level * rng.gamma(4.0, 0.25, n), 2)
        for d, h, a in zip(days, hours, amounts, strict=True):
            when = START + pd.Timedelta(days=int(d)) + pd.Timedelta(hours=float(h))
            rows.append({"user_id": u, "source": "purchase", "timestamp": when.strftime("%Y-%m-%d %H:%M:%S"),
                         "value": a})
        customers.append({"user_id": u, "age": int(rng.integers(18, 75)), "cohort": signup >= DAYS / 2,
                          "last": days[-1], "level": level})
    cust = pd.DataFrame(customers)
    out = pd.DataFrame({
        "user_id": cust["user_id"], "age": cust["age"],
        "cohort": np.where(cust["cohort"], "late", "early"),
        "lifecycle": np.where(cust["last"] < DAYS - LAPSED_AFTER, "lapsed", "active"),
        "spender": np.where(cust["level"] > cust["level"].median(), "high", "low"),
    })
    return pd.DataFrame(rows), out


def main() -> None:
    events, users = purchases()
    events.to_csv(HERE / "purchases.csv", index=False)
    users.to_csv(HERE / "customers.csv", index=False)
    print(f"wrote {len(events)} purchases of {len(users)} customers to {HERE}")


if __name__ == "__main__":
    main()
