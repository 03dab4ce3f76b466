"""Tokenizer health on synthetic and MovieLens-1M data, and training speed against ResidualVQ.

Run:  make bench-tokenizer      (writes bench-results/tokenizer.json)

For each data set the shipped config (experiments/<data>/tokenizer.yaml) is trained as it is,
then its predict writes the tokens dataset and report.json. Figures: util_min (the lowest
share of codes used in the last epoch over every level and block), collision_rate of whole
(user, window) code tuples with the disambiguation token off, recon_mse (validation),
bytes_per_user of the codes and fp32_bytes_per_user of the continuous features they replace;
beside the collision rate, the same split by the number of sources a window holds, and
input_collision_rate, the same tuples built from the tokenizer's input vectors (its floor: equal
inputs get equal codes from any tokenizer). `synthetic-week` is the synthetic config over week
windows.
Speed: benchmarks/tokenizer_speed.py, ours and ResidualVQ side by side in one run.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, machine, previous_figures, write_results  # noqa: E402

from foundv2.bench.report import write_block  # noqa: E402

# name: (shipped tokenizer config, extra flags). `synthetic-week` is the same config over week
# windows (the data config gives day windows, where 2 in 3 windows hold one source's events)
CONFIGS = {"synthetic": ("experiments/synthetic/tokenizer.yaml", []),
           "synthetic-week": ("experiments/synthetic/tokenizer.yaml", ["--data.window_mode", "week"]),
           "movielens-1m": ("experiments/movielens-1m/tokenizer.yaml", [])}


def run_config(name: str, config: str, out: Path, extra: list[str]) -> dict:
    from foundv2.launch import lightning_cli

    run_dir = out / name
    args = ["--config", str(ROOT / Path(config).parent / "data.yaml"), "--config", str(ROOT / config), "--trainer.default_root_dir", str(run_dir),
            "--trainer.logger.init_args.save_dir", str(run_dir), "--model.export_dir", str(run_dir / "export"),
            "--trainer.enable_progress_bar", "false", *extra]
    cli = lightning_cli(args, run=False)
    t0 = time.perf_counter()
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    fit_s = time.perf_counter() - t0
    metrics = {k: float(v) for k, v in cli.trainer.callback_metrics.items()}
    util = {k.removeprefix("codebook/"): v for k, v in metrics.items() if k.startswith("codebook/util/")}
    cli.model.predict_dir = str(run_dir / "tokens")
    import lightning as L

    L.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False).predict(
        cli.model, datamodule=cli.datamodule, return_predictions=False)
    report = json.loads((run_dir / "tokens" / "report.json").read_text())
    floor = input_collisions(cli.model, cli.datamodule)
    return {
        "util_min": min(util.values()),
        # MovieLens' profile is a one-hot zip region: 10 distinct inputs cannot use 64 codes
        "util_min_without_profile": min((v for k, v in util.items() if not k.endswith("/profile")), default=None),
        "util": util,
        "collision_rate": report["collisions"]["collision_rate"],
        "unique_frac": report["collisions"]["unique_frac"],
        "collisions_by_sources_in_window": report["collisions_by_sources_in_window"],
        "max_dup": report["collisions"]["max_dup"],
        "collision_rate_disambiguated": report["collisions_disambiguated"]["collision_rate"],
        # the same tuples built from the tokenizer's input vectors: identical inputs get identical
        # codes from any tokenizer, so this is collision_rate's floor on the data
        "input_collision_rate": floor["collision_rate"],
        "input_unique_frac": floor["unique_frac"],
        "recon_mse": metrics.get("val/recon_mse"),
        "bytes_per_user": report["storage"]["bytes_per_user"],
        "fp32_bytes_per_user": report["storage"]["fp32_bytes_per_user"],
        "fp16_bytes_per_user": report["storage"]["fp16_bytes_per_user"],
        "ratio_fp32": report["storage"]["ratio_fp32"],
        "bits_per_code": report["storage"]["bits_per_code"],
        "fit_seconds": fit_s,
        "config": config,
    }


def input_collisions(model, datamodule) -> dict:
    """collision_stats of the (user, window) tuples made of the tokenizer's inputs instead of its
    codes: every slice's feature vector (exact float bytes) stands for its code. Two windows whose
    slices have equal inputs cannot get different codes, whatever the tokenizer."""
    import torch

    from foundv2.metrics.collisions import collision_stats, window_tuples

    ids: dict[bytes, int] = {}
    parts = []
    model.eval()
    with torch.no_grad():
        for batch in datamodule.predict_dataloader():
            s = model.slices(batch)
            feat = s["feat"].float().contiguous().numpy()
            code = torch.as_tensor([ids.setdefault(r.tobytes(), len(ids)) for r in feat], dtype=torch.long)
            parts.append(torch.stack([batch["user_id"][s["slice_user"]].long(), s["slice_window"].long(),
                                      s["slice_source"].long(), code], dim=1))
    rows = torch.cat(parts)
    return collision_stats(window_tuples(rows[:, 0], rows[:, 1], rows[:, 2], rows[:, 3:], len(model.sources)))


def reachable_codes(rows: int = 4096) -> dict:
    """Level-0 codes an untrained tokenizer can reach, with and without the data init: the fixed
    config of the outside comparison (4 sources of 384-d, ``union``, 2 levels of 256 shared + 4 × 64
    specific codes, code dim 256, hidden 512, no k-means), one training forward, then the codes in
    use on ``rows`` fresh rows. Also the latent RMS of the untrained encoders."""
    import torch
    from tokenizer_speed import _data

    from foundv2.nn.mrqvae import MultiViewRQVAE, RQVAEConfig
    from foundv2.nn.quantizer import QuantizerConfig

    out = {}
    for latent_norm in (False, True):
        for data_init in (False, True):
            torch.manual_seed(0)
            config = QuantizerConfig(layout="union", n_shared_levels=2, n_specific_levels=0, shared_codes=256,
                                     specific_codes=64, kmeans_init=False, respawn=False, data_init=data_init)
            rqvae = RQVAEConfig(code_dim=256, hidden=[512], latent_norm=latent_norm)
            model = MultiViewRQVAE(384, ["s0", "s1", "s2", "s3"], rqvae, config).train()
            (first, first_src), (fresh, fresh_src) = _data(rows, 2, 0)
            model(first, first_src)
            with torch.no_grad():
                res = model.eval()(fresh, fresh_src)
            lv = model.quantizer.levels[0]
            out[f"latent_norm={latent_norm},data_init={data_init}"] = {
                "level0_codes_used": int((res.counts[lv.offset : lv.offset + lv.size] > 0).sum()),
                "level0_codes": lv.size, "latent_rms": float(res.latent.pow(2).mean().sqrt())}
    return out


LABELS = {"synthetic": "synthetic (the shipped day windows)",
          "synthetic-week": "synthetic, the same config over week windows (`--data.window_mode week`)",
          "movielens-1m": "MovieLens-1M (windows of 8 moments)"}
DOCS = ROOT / "docs" / "benchmarks.md"


def docs_block(figures: dict) -> str:
    """The tokenizer health table and the speed line, as docs/benchmarks.md shows them."""
    m = machine()
    f = lambda v, fmt: "-" if v is None else format(v, fmt)  # noqa: E731
    lines = [f"`make bench-tokenizer` ({m['cores']} cores, torch {m['libraries']['torch']}): the shipped "
             f"`experiments/*/tokenizer.yaml`, fitted and predicted as they are.", "",
             "| data | util_min | util_min without profile | collision_rate | input floor | recon_mse | bytes/user "
             "| fp32 bytes/user | ratio | fit s |", "|---|---|---|---|---|---|---|---|---|---|"]
    for name, label in LABELS.items():
        r = figures.get(name)
        if r:
            lines.append(f"| {label} | {r['util_min']:.3f} | {f(r['util_min_without_profile'], '.3f')} | "
                         f"{r['collision_rate']:.4f} | {r['input_collision_rate']:.4f} | {f(r['recon_mse'], '.3g')} | "
                         f"{r['bytes_per_user']:,.0f} | {r['fp32_bytes_per_user']:,.0f} | {r['ratio_fp32']:.0f}x | "
                         f"{r['fit_seconds']:.0f} |")
    sp = figures.get("speed")
    if sp:
        lines += ["", f"Speed (`benchmarks/tokenizer_speed.py`, {sp['torch_threads']} threads): one training step, "
                      f"ours {sp['ours_step_s']:.4f} s, ResidualVQ {sp['residualvq_step_s']:.4f} s (ratio "
                      f"{sp['ratio_ours_over_residualvq']:.2f}), {sp['ours_slices_per_s']:,.0f} against "
                      f"{sp['residualvq_slices_per_s']:,.0f} slices/s; distances at {sp['distance_gflops']:.0f} GFLOP/s "
                      f"({sp['distance_matmul_only_gflops']:.0f} matmul-only) against a measured fp32 matmul peak "
                      f"of {sp['matmul_peak_gflops']:.0f} GFLOP/s."]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=str(ROOT / "runs" / "bench-tokenizer"))
    ap.add_argument("--only", default=None, help="one data set name")
    ap.add_argument("--no-speed", action="store_true")
    ap.add_argument("--extra", default="", help="more CLI flags for every config run, one string "
                    "(e.g. \"--model.quantizer.specific_codes 256\"): a variant without a config copy")
    a = ap.parse_args()
    more = shlex.split(a.extra)
    # a partial run updates the last full one
    figures = previous_figures("tokenizer", (*CONFIGS, "speed", "reachable")) if a.only or a.no_speed else {}
    for name, (config, extra) in CONFIGS.items():
        if a.only and name != a.only:
            continue
        figures[name] = {**run_config(name, config, Path(a.out), [*extra, *more]), "extra_flags": [*extra, *more]}
        print(name, json.dumps({k: v for k, v in figures[name].items() if k != "util"}), flush=True)
    figures["reachable"] = reachable_codes()
    print("reachable", json.dumps(figures["reachable"]), flush=True)
    if not a.no_speed:
        from tokenizer_speed import measure_speed

        figures["speed"] = measure_speed()
    write_results("tokenizer", figures, {"configs": {k: c for k, (c, _) in CONFIGS.items()}})
    if not more:  # a variant (--extra) is an experiment, not the shipped configs' figures
        write_block(DOCS, "bench_tokenizer", "make bench-tokenizer", docs_block(figures))


if __name__ == "__main__":
    main()
