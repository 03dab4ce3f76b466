#!/usr/bin/env bash
# GPU check of foundv2's CLI stages. Meant to run ON A GPU MACHINE (one CUDA GPU), from the repo
# root, with a python3 that already has a CUDA build of torch (the project is installed on top of
# it with --no-deps, so that torch is kept).
#
#   bash benchmarks/gpu_check.sh [PARTS]      PARTS: any of  setup q tok fp32 paper ddp   (default: all)
#
# What it does, each stage once on the synthetic data set with the hashing text encoder:
#   q      stage 1 (experiments/synthetic/qformer.yaml): fit 1 epoch bf16-mixed, 20k users, then
#          predict the features dataset to $WORK/feat from the saved last.ckpt
#   tok    stage 2 (experiments/synthetic/tokenizer.yaml) on those features: fit (bf16-mixed),
#          then predict with --model.pretrained <export dir> to $WORK/tokens; prints report.json
#   fp32   the same tokenizer fit in 32-true, for the speed comparison
#   paper  experiments/paper-gpu/tokenizer.yaml (4 shared + 2 specific levels of 1024 x 256-d
#          codes) on 50k synthetic users, 1 epoch, 4 workers, bf16-mixed (pooled features on the fly)
#   ddp    the tokenizer fit again with --trainer.strategy ddp --trainer.devices 1 (the DDP code
#          paths on one process; real multi-GPU DDP needs more than one GPU)
# benchmarks/tokenizer_speed.py is CPU-only (no device option), so it is not run here.
#
# What it prints: the CLI's own output (progress bars), and after every fit/predict one line
#   GPUSTATS {"label": ..., "steps_per_s": ..., "users_per_s": ..., "peak_alloc_mib": ...}
# measured by a small Lightning callback (written to $WORK/gpucb.py and added with
# --trainer.callbacks+=gpucb.GpuStats): train steps/s and users/s over each epoch's batches after
# the first WARMUP (the end of every step is synchronised; validation is not counted), predict
# users/s over the whole predict loop, and torch.cuda.max_memory_allocated / reserved. The same
# lines go to $OUT/stats.jsonl (or $WORK/stats.jsonl), then a summary table at the end.
# nvidia-smi samples memory.used every 500 ms into $WORK/smi.csv.
#
# Environment knobs (defaults in brackets): ACCEL [gpu], WORK [/tmp/gpucheck], N_USERS [20000],
# PAPER_USERS [50000], TOK_EPOCHS [2], WHEELS [.cache/gpu-whl: wheels of missing pure-python
# deps, installed to /tmp/site when python3 lacks them], EXTRA [extra trainer args for every fit,
# e.g. "--trainer.limit_train_batches 5" for a smoke test].
#
# By its documented package list (not checked on a machine), the GPU image (python3 3.12, torch 2.11+cu130, lightning, ...)
# lacks datasets, jsonargparse and their small deps and cannot reach PyPI. Fetch them beforehand, on
# a machine that can, into the gitignored .cache/gpu-whl, and carry that folder to the GPU machine:
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
#     -d .cache/gpu-whl datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19 jsonargparse==4.53.0 \
#     docstring_parser==0.18.0 typeshed_client==2.14.0 pyarrow==26.0.1 fsspec==2026.9.0
# (about 57 MB; pyarrow and fsspec are installed only if the machine's version is outside datasets' range)
# Tested so far only as a CPU smoke test, which passed every part:
#   ACCEL=cpu N_USERS=400 PAPER_USERS=400 WARMUP=1 TOK_EPOCHS=1 PY=.venv/bin/python \
#     EXTRA="--trainer.limit_train_batches 3 --trainer.limit_val_batches 2" bash benchmarks/gpu_check.sh q tok fp32 paper ddp
set -u
cd "$(dirname "$0")/.."
PARTS="${*:-setup q tok fp32 paper ddp}"
ACCEL="${ACCEL:-gpu}"
WORK="${WORK:-/tmp/gpucheck}"
N_USERS="${N_USERS:-20000}"
PAPER_USERS="${PAPER_USERS:-50000}"
TOK_EPOCHS="${TOK_EPOCHS:-2}"
WHEELS="${WHEELS:-.cache/gpu-whl}"
EXTRA="${EXTRA:-}"
PY="${PY:-python3}"
STATS="${OUT:-$WORK}/stats.jsonl"
export PYTHONUNBUFFERED=1 WARMUP="${WARMUP:-10}" GPUSTATS_FILE="$STATS"
mkdir -p "$WORK" "$(dirname "$STATS")"
export PYTHONPATH="$WORK${PYTHONPATH:+:$PYTHONPATH}"
DATA_ARGS=(--data.loader_args "{\"n_users\": $N_USERS, \"seed\": 0}" --data.cache_dir "$WORK/cache")
COMMON=(--trainer.accelerator "$ACCEL" --trainer.devices 1)
CB=(--trainer.callbacks+=gpucb.GpuStats)

banner() { echo; echo "=================== $* ==================="; }
run() {  # run a command, echo it, record its status (never stops the script)
  echo "+ $*"
  local t0=$SECONDS
  "$@"; local rc=$?
  echo "+ exit $rc after $((SECONDS - t0)) s: $1 ${*:2:4}"
  [ $rc -eq 0 ] || echo "FAILED rc=$rc: $*" >>"$WORK/failures.txt"
  return $rc
}
last_ckpt() { ls -t "$1"/tb/version_*/checkpoints/last.ckpt 2>/dev/null | head -1; }
health() {  # codebook health the fit logged to TensorBoard (last value): util, perplexity, dead codes, val collisions
  "$PY" - "$1" <<'PYEOF' || true
import glob, sys
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
for ev in sorted(glob.glob(sys.argv[1] + "/tb/version_*")):
    acc = EventAccumulator(ev); acc.Reload()
    for tag in sorted(acc.Tags().get("scalars", [])):
        if tag.startswith(("codebook/", "val/")):
            print(f"  {sys.argv[1]} {tag:32s} {acc.Scalars(tag)[-1].value:.4f}")
PYEOF
}

cat >"$WORK/gpucb.py" <<'PYEOF'
import json, os, time
import torch
from lightning.pytorch.callbacks import Callback

def _users(batch):
    u = batch.get("user_id") if isinstance(batch, dict) else None
    return int(u.shape[0]) if u is not None else 0

def _sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()

class GpuStats(Callback):
    """Train steps/s and users/s (after WARMUP batches of each epoch), predict users/s, peak memory."""

    def __init__(self, label: str = ""):
        self.label = label or os.environ.get("GPUSTATS_LABEL", "")
        self.warmup = int(os.environ.get("WARMUP", "10"))

    def setup(self, trainer, pl_module, stage):
        self.stage, self.t_total, self.steps, self.users, self.epochs = stage, 0.0, 0, 0, []
        self.wall0 = time.perf_counter()
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()

    def on_train_epoch_start(self, trainer, pl_module):
        self.i, self.t0, self.e_steps, self.e_users = 0, None, 0, 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.i += 1
        if self.i == self.warmup:
            _sync(); self.t0 = time.perf_counter()
        elif self.i > self.warmup:
            _sync(); self.t_last = time.perf_counter()
            self.e_steps += 1; self.e_users += _users(batch)

    def on_train_epoch_end(self, trainer, pl_module):
        if self.t0 is not None and self.e_steps:
            dt = self.t_last - self.t0
            self.t_total += dt; self.steps += self.e_steps; self.users += self.e_users
            self.epochs.append(round(self.e_steps / dt, 2))

    def on_predict_start(self, trainer, pl_module):
        _sync(); self.p0, self.p_users, self.p_steps = time.perf_counter(), 0, 0

    def on_predict_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        self.p_users += _users(batch); self.p_steps += 1

    def teardown(self, trainer, pl_module, stage):
        _sync()
        r = {"label": self.label, "stage": stage, "rank": trainer.global_rank,
             "precision": str(trainer.precision), "strategy": type(trainer.strategy).__name__,
             "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
             "wall_s": round(time.perf_counter() - self.wall0, 1)}
        if stage == "fit" and self.steps:
            r.update(steps_timed=self.steps, steps_per_s=round(self.steps / self.t_total, 2),
                     users_per_s=round(self.users / self.t_total, 1), steps_per_s_by_epoch=self.epochs)
        if stage == "predict" and getattr(self, "p_steps", 0):
            dt = time.perf_counter() - self.p0
            r.update(predict_batches=self.p_steps, predict_users=self.p_users,
                     users_per_s=round(self.p_users / dt, 1), predict_s=round(dt, 1))
        if torch.cuda.is_available():
            r.update(peak_alloc_mib=round(torch.cuda.max_memory_allocated() / 2**20),
                     peak_reserved_mib=round(torch.cuda.max_memory_reserved() / 2**20))
        line = json.dumps(r)
        print("GPUSTATS " + line, flush=True)
        with open(os.environ.get("GPUSTATS_FILE", "gpustats.jsonl"), "a") as f:
            f.write(line + "\n")
PYEOF

# ------------------------------------------------------------------------------------ setup
if [[ " $PARTS " == *" setup "* ]]; then
  banner "setup: machine, python, torch"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1
  command -v "$PY"; "$PY" --version
  "$PY" - <<'PYEOF'
import importlib.metadata as md
for n in ["torch", "lightning", "torchmetrics", "datasets", "transformers", "tensorboard", "jsonargparse",
          "docstring-parser", "typeshed-client", "pyarrow", "pandas", "numpy", "scikit-learn", "matplotlib",
          "scipy", "safetensors", "fsspec", "huggingface-hub", "dill", "multiprocess", "xxhash", "omegaconf"]:
    try:
        print(f"  {n:18s} {md.version(n)}")
    except md.PackageNotFoundError:
        print(f"  {n:18s} MISSING")
import torch
print("  cuda", torch.version.cuda, "available", torch.cuda.is_available(), torch.cuda.device_count(), "GPU(s)")
PYEOF
  # can we reach PyPI? (the device docs say no: nothing outside can be reached)
  timeout 8 "$PY" -m pip download --no-deps -q -d /tmp/pipprobe six >/dev/null 2>&1 \
    && echo "PyPI: reachable" || echo "PyPI: NOT reachable"
  # carried wheels: install those whose package is missing or too old, into /tmp/site
  if [ -d "$WHEELS" ]; then
    SEL=$("$PY" - "$WHEELS" <<'PYEOF'
import glob, sys, importlib.metadata as md
from packaging.version import Version
need = {"datasets": ("5.2.0", None), "dill": ("0.3.0", "0.4.2"), "multiprocess": ("0.70.19", "0.70.20"),
        "jsonargparse": ("4.27", None), "docstring_parser": ("0.15", None), "typeshed_client": ("2.1", None),
        "pyarrow": ("24.0.0", None), "fsspec": ("2023.1.0", "2026.9.0.post0")}
out = []
for w in sorted(glob.glob(sys.argv[1] + "/**/*.whl", recursive=True)):
    name = w.rsplit("/", 1)[1].split("-")[0]
    lo, hi = need.get(name, ("0", None))
    try:
        v = Version(md.version(name))
        if v >= Version(lo) and (hi is None or v < Version(hi)):
            continue
    except md.PackageNotFoundError:
        pass
    out.append(w)
print(" ".join(out))
PYEOF
)
    echo "installing carried wheels: ${SEL:-none needed}"
    if [ -n "$SEL" ]; then
      "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site $SEL \
        && echo "/tmp/site" >"$WORK/site"
    fi
  fi
  # the project itself, without dependencies (keeps the machine's torch)
  "$PY" -m pip install -q --no-deps --no-build-isolation -e . 2>&1 | tail -3 || true
fi
[ -f "$WORK/site" ] && export PYTHONPATH="$(cat "$WORK/site"):$PYTHONPATH"
"$PY" -c "import foundv2.launch, foundv2.pipeline, data_modules.datamodule, datasets, jsonargparse; print('foundv2 imports OK')" \
  || echo "FAILED: foundv2 imports" >>"$WORK/failures.txt"

# nvidia-smi memory sampler for the whole script
SMI_PID=
if command -v nvidia-smi >/dev/null; then
  nvidia-smi --query-gpu=timestamp,memory.used,utilization.gpu --format=csv,noheader -lms 500 >>"$WORK/smi.csv" 2>/dev/null &
  SMI_PID=$!
fi

# ------------------------------------------------------------------------------------ stage 1
if [[ " $PARTS " == *" q "* ]]; then
  banner "stage 1: qformer fit (bf16-mixed)"
  GPUSTATS_LABEL=qformer-fit-bf16 run "$PY" -m foundv2 fit --config experiments/synthetic/data.yaml --config experiments/synthetic/qformer.yaml \
    "${DATA_ARGS[@]}" --trainer.max_epochs 1 "${COMMON[@]}" --trainer.precision bf16-mixed \
    --trainer.default_root_dir "$WORK/q" --trainer.logger.init_args.save_dir "$WORK/q" "${CB[@]}" $EXTRA
  CK=$(last_ckpt "$WORK/q"); echo "checkpoint: $CK"
  banner "stage 1: qformer predict -> $WORK/feat"
  GPUSTATS_LABEL=qformer-predict-bf16 run "$PY" -m foundv2 predict --config experiments/synthetic/data.yaml --config experiments/synthetic/qformer.yaml \
    "${DATA_ARGS[@]}" "${COMMON[@]}" --trainer.precision bf16-mixed --trainer.logger false \
    --trainer.default_root_dir "$WORK/q" --ckpt_path "$CK" --model.predict_dir "$WORK/feat" "${CB[@]}"
  ls -la "$WORK/feat"; cat "$WORK/feat/meta.json" 2>/dev/null | head -c 600; echo
fi

TOK=(--config experiments/synthetic/data.yaml --config experiments/synthetic/tokenizer.yaml "${DATA_ARGS[@]}" --data.features_dir "$WORK/feat" --model.recon_weights null "${COMMON[@]}")
# ------------------------------------------------------------------------------------ stage 2
if [[ " $PARTS " == *" tok "* ]]; then
  banner "stage 2: tokenizer fit (bf16-mixed, $TOK_EPOCHS epochs) on $WORK/feat"
  GPUSTATS_LABEL=tokenizer-fit-bf16 run "$PY" -m foundv2 fit "${TOK[@]}" --trainer.precision bf16-mixed \
    --trainer.max_epochs "$TOK_EPOCHS" --trainer.default_root_dir "$WORK/tok" \
    --trainer.logger.init_args.save_dir "$WORK/tok" --model.export_dir "$WORK/tok/export" "${CB[@]}" $EXTRA
  ls "$WORK/tok/export"
  banner "stage 2: tokenizer predict (--model.pretrained) -> $WORK/tokens"
  GPUSTATS_LABEL=tokenizer-predict-bf16 run "$PY" -m foundv2 predict "${TOK[@]}" --trainer.precision bf16-mixed \
    --trainer.logger false --trainer.default_root_dir "$WORK/tok" \
    --model.pretrained "$WORK/tok/export" --model.predict_dir "$WORK/tokens" "${CB[@]}"
  echo "--- $WORK/tokens/report.json"; cat "$WORK/tokens/report.json"; echo
  [ -n "${OUT:-}" ] && cp "$WORK/tokens/report.json" "$OUT/tokens_report.json" 2>/dev/null
  health "$WORK/tok"
fi

# ------------------------------------------------------------------------------------ fp32
if [[ " $PARTS " == *" fp32 "* ]]; then
  banner "tokenizer fit in 32-true (speed comparison)"
  GPUSTATS_LABEL=tokenizer-fit-fp32 run "$PY" -m foundv2 fit "${TOK[@]}" --trainer.precision 32-true \
    --trainer.max_epochs "$TOK_EPOCHS" --trainer.default_root_dir "$WORK/tok32" \
    --trainer.logger.init_args.save_dir "$WORK/tok32" --model.export_dir "$WORK/tok32/export" "${CB[@]}" $EXTRA
  health "$WORK/tok32"
fi

# ------------------------------------------------------------------------------------ paper-gpu
if [[ " $PARTS " == *" paper "* ]]; then
  banner "paper-gpu tokenizer: 4+2 levels x 1024 codes x 256-d, $PAPER_USERS users, 1 epoch (bf16-mixed)"
  GPUSTATS_LABEL=paper-tokenizer-fit-bf16 run "$PY" -m foundv2 fit --config experiments/paper-gpu/data.yaml --config experiments/paper-gpu/tokenizer.yaml \
    --data.loader_args "{\"n_users\": $PAPER_USERS, \"seed\": 0, \"chunk_users\": 20000}" \
    --data.cache_dir "$WORK/cache" --data.num_workers 4 --trainer.max_epochs 1 "${COMMON[@]}" \
    --trainer.precision bf16-mixed --trainer.default_root_dir "$WORK/paper" \
    --trainer.logger.init_args.save_dir "$WORK/paper" --model.export_dir "$WORK/paper/export" "${CB[@]}" $EXTRA
  health "$WORK/paper"
fi

# ------------------------------------------------------------------------------------ ddp (1 device)
if [[ " $PARTS " == *" ddp "* ]]; then
  banner "tokenizer fit with --trainer.strategy ddp --trainer.devices 1 (bf16-mixed, 1 epoch)"
  GPUSTATS_LABEL=tokenizer-fit-ddp1-bf16 run "$PY" -m foundv2 fit "${TOK[@]}" --trainer.strategy ddp \
    --trainer.precision bf16-mixed --trainer.max_epochs 1 --trainer.default_root_dir "$WORK/tokddp" \
    --trainer.logger.init_args.save_dir "$WORK/tokddp" --model.export_dir "$WORK/tokddp/export" "${CB[@]}" $EXTRA
  health "$WORK/tokddp"
  banner "tokenizer predict with --trainer.strategy ddp --trainer.devices 1"
  GPUSTATS_LABEL=tokenizer-predict-ddp1-bf16 run "$PY" -m foundv2 predict "${TOK[@]}" --trainer.strategy ddp \
    --trainer.precision bf16-mixed --trainer.logger false --trainer.default_root_dir "$WORK/tokddp" \
    --model.pretrained "$WORK/tokddp/export" --model.predict_dir "$WORK/tokens_ddp" "${CB[@]}"
  cat "$WORK/tokens_ddp/report.json" 2>/dev/null | head -c 400; echo
fi

[ -n "$SMI_PID" ] && kill "$SMI_PID" 2>/dev/null
banner "summary"
if [ -f "$WORK/smi.csv" ]; then
  awk -F', ' '{gsub(/ MiB/,"",$2); if ($2+0 > m) m = $2+0} END {print "nvidia-smi peak memory.used: " m " MiB"}' "$WORK/smi.csv"
  [ -n "${OUT:-}" ] && cp "$WORK/smi.csv" "$OUT/smi.csv"
fi
"$PY" - "$STATS" <<'PYEOF' || cat "$STATS"
import json, sys
print(f"{'label':28s} {'stage':8s} {'prec':10s} {'steps/s':>8s} {'users/s':>9s} {'peakMiB':>8s} {'resMiB':>7s} {'wall_s':>7s}")
for line in open(sys.argv[1]):
    r = json.loads(line)
    print(f"{r['label']:28s} {r['stage']:8s} {r['precision']:10s} {r.get('steps_per_s', ''):>8} "
          f"{r.get('users_per_s', ''):>9} {r.get('peak_alloc_mib', ''):>8} {r.get('peak_reserved_mib', ''):>7} {r['wall_s']:>7}")
PYEOF
echo "failures:"; cat "$WORK/failures.txt" 2>/dev/null || echo "  none"
