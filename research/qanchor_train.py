"""Does QAnchorStage's contrastive term train? A short fit, printing the InfoNCE loss and
accuracy (and the next-token loss) averaged over every ``--every`` steps, beside chance.

Run (MovieLens-100k questions, SmolLM2-135M, one thread):

    PYTHONPATH=$PWD OMP_NUM_THREADS=1 python research/qanchor_train.py --data movielens-100k \\
        --lm smollm2 --steps 200 --batch 16 --max-events 32

``--data synthetic`` (with ``--lm tiny``) is the quick check. The stage options under test are
flags (``--learn-tau``, ``--head-norm``, ``--tau``, ``--lr``, ``--fn-margin``, ``--lora-r``); the
result (one line per window and a summary) goes to stdout and, with ``--out``, to a JSON file.
Chance accuracy is about ``1 / (2B - 1)`` (B answers and B - 1 other users per anchor, fewer
when same-answer candidates are dropped); chance loss about ``log(2B - 1)``.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import lightning as L
import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from data_modules.datamodule import UserDataModule  # noqa: E402
from foundv2.nn.anchor import AnchorHeadConfig  # noqa: E402
from foundv2.stages.base import OptimConfig  # noqa: E402
from foundv2.stages.qanchor import QAnchorStage  # noqa: E402

SYNTHETIC_QUESTIONS = [{"name": "future", "query": "What will this user do next?", "answer": "future_summary"},
                       {"name": "fav", "query": "Which categories does this user like most?",
                        "answer": "top_categories"},
                       {"name": "tod", "query": "When in the day is this user active?", "answer": "time_of_day"}]


def datamodule(args) -> UserDataModule:
    if args.data == "synthetic":
        return UserDataModule(dataset="synthetic", loader_args={"n_users": args.users, "seed": 3}, window_mode="day",
                              text_encoder="hashing", cache_dir=args.cache_dir, batch_size=args.batch, progress=False,
                              max_events=args.max_events, questions=SYNTHETIC_QUESTIONS)
    data = yaml.safe_load((ROOT / "experiments" / args.data / "data.yaml").read_text())["data"]
    data.update(batch_size=args.batch, max_events=args.max_events, questions=True, cache_dir=args.cache_dir,
                progress=False)
    return UserDataModule(**data)


TERMS = ("loss/nce", "acc/nce", "loss/ntp", "tau")


class Curve(L.Callback):
    """Per-step train terms (the stage's own logged values), printed as a window's mean every
    ``every`` steps while training."""

    def __init__(self, every: int):
        self.rows: list[dict] = []
        self.windows: list[dict] = []
        self.every = every
        self.t0 = time.perf_counter()

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        m = trainer.callback_metrics
        row = {k.removeprefix("train/").removesuffix("_step"): float(v) for k, v in m.items()
               if k.startswith("train/") and k.endswith("_step")}
        row["seconds"] = time.perf_counter() - self.t0
        self.rows.append(row)
        if len(self.rows) % self.every == 0:
            self.window(self.rows[-self.every:], len(self.rows) - self.every)

    def on_train_end(self, trainer, module):
        left = len(self.rows) % self.every
        if left:
            self.window(self.rows[-left:], len(self.rows) - left)

    def window(self, part: list[dict], start: int) -> None:
        w = {k: sum(r[k] for r in part) / len(part) for k in TERMS}
        w.update(steps=f"{start + 1}-{start + len(part)}", seconds=part[-1]["seconds"])
        self.windows.append(w)
        print(f"steps {w['steps']:>9}  nce {w['loss/nce']:.3f}  acc {w['acc/nce']:.3f}  ntp {w['loss/ntp']:.3f}  "
              f"tau {w['tau']:.4f}  ({w['seconds']:.0f} s)", flush=True)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default="synthetic")
    p.add_argument("--users", type=int, default=160, help="synthetic users")
    p.add_argument("--lm", default="tiny")
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--max-events", type=int, default=48)
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--tau", type=float, default=0.07)
    p.add_argument("--learn-tau", action="store_true")
    p.add_argument("--head-norm", action="store_true")
    p.add_argument("--fn-margin", type=float, default=0.1, help="negative: off")
    p.add_argument("--ntp-weight", type=float, default=1.0)
    p.add_argument("--nce-weight", type=float, default=1.0)
    p.add_argument("--lora-r", type=int, default=0)
    p.add_argument("--emb-dim", type=int, default=128)
    p.add_argument("--head-hidden", type=int, default=512)
    p.add_argument("--warmup", type=int, default=0)
    p.add_argument("--every", type=int, default=10)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--cache-dir", default=".cache/foundv2")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    L.seed_everything(0, verbose=False)
    dm = datamodule(args)
    head = AnchorHeadConfig(emb_dim=args.emb_dim, hidden=args.head_hidden, norm=args.head_norm)
    stage = QAnchorStage(lm=args.lm, head=head, tau=args.tau, learn_tau=args.learn_tau,
                         fn_margin=None if args.fn_margin < 0 else args.fn_margin, ntp_weight=args.ntp_weight,
                         nce_weight=args.nce_weight, prefix_slots=args.max_events,
                         lora_r=args.lora_r,
                         optim=OptimConfig(lr=args.lr, weight_decay=0.0, warmup_steps=args.warmup))
    curve = Curve(args.every)
    trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, enable_checkpointing=False, limit_val_batches=0,
                        max_steps=args.steps, callbacks=[curve], log_every_n_steps=1)
    trainer.fit(stage, datamodule=dm)
    chance = {"acc": 1 / (2 * args.batch - 1), "loss": math.log(2 * args.batch - 1)}
    windows = curve.windows
    result = {"args": vars(args), "chance": chance, "pairs": len(dm.qa_pairs()),
              "steps_per_epoch": math.ceil(len(dm.qa_pairs()) / args.batch), "windows": windows,
              "seconds_per_step": curve.rows[-1]["seconds"] / len(curve.rows)}
    print(json.dumps({k: result[k] for k in ("chance", "pairs", "steps_per_epoch", "seconds_per_step")}))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
