"""Research for issue 11 (stage 3): is the token-sum readout beatable by other readouts of the
same tokens, or is the next-item gap of ``aligned_tokens`` the probe's width?

Run:  python benchmarks/explore_alignment.py [NAME=STEP/FOLDER ...]
      (after ``python benchmarks/bench_alignment.py --only synthetic``, whose run folder
      ``runs/synthetic/alignment-bench`` holds the tokens; ~2.5 min per representation on 2 cores)

It reads the synthetic alignment-bench tokens and builds, from the tokens alone:

- ``tokens_sum``: the bench's per-source sum of decoded code vectors (160-d);
- ``sum+decay0.8``: that, and beside it the same sum with each window weighted 0.8 ** (days
  before the user's last window): a recency readout;
- ``sum+last``: that, and beside it the sum over the user's last window only;

and any embeddings of the run folder given as ``NAME=STEP/FOLDER`` (e.g. a stage-3 step fitted
with ``--model.init_args.user_pool sum``). Every row goes through the bench's probes (the
explore_tokens helpers: logistic probes with C on val, the linear next-item probe) and is compared
with ``tokens_sum`` by paired bootstrap over the test users. Test scores are cached under
``runs/explore_alignment/``. Prints the figures; writes nothing else.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
import explore_tokens as E  # noqa: E402
from common import ROOT  # noqa: E402

RUN = ROOT / "runs" / "synthetic" / "alignment-bench"
E.CACHE = ROOT / "runs" / "explore_alignment"
E.TASK_METRIC = {"segment": "accuracy", "churn": "auc", "spender": "auc", "future_categories": "macro_auc",
                 "next_items": "ndcg@10"}
DECAY = 0.8  # per day of the recency readout


def token_readouts(n_rows: int) -> dict[str, np.ndarray]:
    """``tokens_sum`` and the two widened readouts (see the module docstring)."""
    from data_modules.store import read_stage_output
    from foundv2.nn.mrqvae import MultiViewRQVAE

    ds, meta = read_stage_output(RUN / "tokenizer" / "tokens")
    ds = ds.with_format("numpy")
    model = MultiViewRQVAE.from_pretrained(RUN / "tokenizer" / "export").eval()
    S = len(meta["sources"])
    total = decayed = last = None
    for start in range(0, len(ds), 2048):
        part = ds[start : start + 2048]
        for r, codes, src, key in zip(part["row"], part["codes"], part["slice_source"], part["slice_key"], strict=True):
            if len(src) == 0:
                continue
            codes = np.stack(codes) if codes.dtype == object else codes
            with torch.no_grad():
                q = model.quantizer.decode_codes(torch.as_tensor(codes, dtype=torch.long),
                                                 torch.as_tensor(src, dtype=torch.long)).numpy()
            if total is None:
                total, decayed, last = (np.zeros((n_rows, S, q.shape[1]), np.float32) for _ in range(3))
            src = src.astype(np.int64)
            age = np.asarray(key, np.float64).max() - np.asarray(key, np.float64)
            np.add.at(total[r], src, q)
            np.add.at(decayed[r], src, q * (DECAY ** age)[:, None])
            np.add.at(last[r], src[age == 0], q[age == 0])
    flat = lambda a: a.reshape(n_rows, -1)  # noqa: E731
    return {"tokens_sum": flat(total), f"sum+decay{DECAY}": np.concatenate([flat(total), flat(decayed)], 1),
            "sum+last": np.concatenate([flat(total), flat(last)], 1)}


def embeddings(folder: Path, n_rows: int) -> np.ndarray:
    from data_modules.store import read_stage_output

    ds, _ = read_stage_output(folder)
    ds = ds.with_format("numpy")
    X = np.zeros((n_rows, len(ds[0]["user_emb"])), np.float32)
    X[ds["row"]] = np.stack(ds["user_emb"])
    return X


def main() -> None:
    from data_modules.datamodule import UserDataModule
    from foundv2.bench.run import load_bench_data

    data_cfg = yaml.safe_load((ROOT / "experiments" / "synthetic" / "data.yaml").read_text())["data"]
    dm = UserDataModule(**data_cfg, progress=False)  # the data config the alignment bench ran on
    dm.prepare_data()
    data = load_bench_data(dm)
    n = len(data.split)
    reps = token_readouts(n)
    for arg in sys.argv[1:]:
        name, _, rel = arg.partition("=")
        reps[name] = embeddings(RUN / rel, n)
    res = {}
    for name, X in reps.items():
        t0 = time.time()
        res[name] = E.probe(name, lambda X=X: X, 0, data)
        print(name, {k: round(v, 4) for k, v in res[name]["metrics"].items()}, f"{time.time() - t0:.0f} s", flush=True)
    for name in reps:
        if name != "tokens_sum":
            vs = E.compare(res[name], res["tokens_sum"], data)
            print(f"{name} - tokens_sum", json.dumps({t: {k: round(v, 4) for k, v in c.items()} for t, c in vs.items()}))


if __name__ == "__main__":
    main()
