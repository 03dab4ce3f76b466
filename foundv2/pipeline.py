"""``foundv2 pipeline``: a list of declared steps (stage fits and predicts, the bench) in one run folder.

A pipeline YAML declares each step once: its config, its extra flags, what it writes and which
outputs of earlier steps it reads, into which config key. The data config is given once, for
the whole pipeline, and is every step's first ``--config``::

    pipeline:
      run_dir: runs/movielens-100k/pipeline
      data: experiments/movielens-100k/data.yaml
      steps:
        - name: stage1
          config: experiments/movielens-100k/qformer.yaml
          output: features                                 # its predict output
        - name: tokenizer
          config: experiments/movielens-100k/tokenizer.yaml
          output: tokens
          writes: {export: model.export_dir}               # another folder, and the key that receives it
          reads: {data.features_dir: stage1/features}
        - name: bench
          kind: bench
          config: experiments/movielens-100k/bench.yaml
          reads: {bench.embeddings.qformer: stage1/features, bench.tokens_dir: tokenizer/tokens,
                  bench.tokenizer_dir: tokenizer/export}

A ``stage`` step fits its YAML's LightningModule (resuming from ``last.ckpt`` after a crash),
then predicts from the best checkpoint into its output; a ``qanchor`` step is a stage step (a
:class:`~foundv2.stages.qanchor.QAnchorStage` YAML) that also puts that checkpoint into its
``model`` folder (``model/stage.ckpt``, hard-linked where it can be), which a later step reads
as ``<step>/model``: the bench's ``bench.qanchor.<name>`` (base, prompt-tuned and no-query
rows, :mod:`foundv2.bench.qanchor`) or ``foundv2 embed``; a ``bench`` step calls
:func:`foundv2.bench.run.run_bench` on rank 0 with its YAML's ``bench:`` arguments. Adding a
stage is one more entry. Everything a step writes lives in ``<run_dir>/<name>/`` (logs,
checkpoints, ``fit.done``, its outputs; the bench's ``bench.json``, ``report.md``, plots).

Each step has its own fingerprint (``<run_dir>/<name>/fingerprint.json``): the text of the data
config and of its own config, its flags, the fingerprints of the steps it reads, and the code it
runs (every ``foundv2`` / ``data_modules`` module reachable by imports from its entry modules:
:func:`code_closure`). A complete step whose fingerprint matches is skipped; a step whose
fingerprint changed is rerun, and so are the steps that read it, because their fingerprints
hold its own; nothing else is touched. ``on_change`` says whether a changed step stops the run
(``error``, the default) or has its folder removed and is run again (``restart``).

The console shows what a person needs: a line as each step starts and ends, one progress bar
line per fit, predict and bench, then the results table and where the report is. Everything
else a step logs (Lightning's INFO lines, model summaries, warnings) goes to
``<run_dir>/<step>/log.txt`` (:mod:`foundv2.console`). The run folder and every existing step
folder are checked writable before anything runs.
"""

from __future__ import annotations

import ast
import hashlib
import json
import os
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from data_modules.schema import DataError
from data_modules.store import atomic_write_json, check_writable, output_is_complete
from foundv2 import console, launch

FINGERPRINT = "fingerprint.json"
FINGERPRINT_WAIT_S = 600
#: the file whose presence marks a bench step complete (written by the bench's report)
BENCH_DONE = "bench.json"
#: the repository whose modules a code fingerprint hashes, and its packages
REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("foundv2", "data_modules")
#: each kind of step: the modules its code fingerprint starts from (a stage adds the modules of
#: every foundv2/data_modules ``class_path`` in its YAML: its LightningModule, callbacks)
KIND_CODE = {"stage": ("foundv2.launch", "data_modules.datamodule"), "bench": ("foundv2.launch", "foundv2.bench.run"),
             "qanchor": ("foundv2.launch", "data_modules.datamodule", "foundv2.stages.qanchor")}
#: step kinds that fit a stage (and predict into their output)
STAGE_KINDS = ("stage", "qanchor")
#: the folder of a qanchor step that holds its checkpoint, and the checkpoint's name in it
MODEL_FOLDER = "model"


@dataclass
class Step:
    """One step of a pipeline.

    Args:
        name: the step's folder under run_dir (everything it writes goes there) and the name
            later steps read it by.
        config: its YAML: a stage config (trainer and model sections) for ``stage``, a config
            with a ``bench:`` section for ``bench``. No ``data:`` section: the pipeline's data
            config is given to every step. Or a list of YAMLs layered in order (each a
            ``--config``, later ones win), e.g. a stage config and a small file holding only what
            this use of it changes; every one of them is in the step's fingerprint.
        kind: ``stage`` (fit, then predict from the best checkpoint), ``qanchor`` (a stage step whose
            checkpoint is also put into its ``model`` folder) or ``bench`` (run_bench on rank 0).
        args: extra flags for this step only, after its YAML, e.g. ["--trainer.max_epochs", "4"].
        output: a stage's predict output, a folder in the step's folder (given as --model.predict_dir).
        writes: other folders a stage writes in its folder: folder name → the config key that
            receives its path, e.g. {export: model.export_dir}.
        reads: config key → ``<step>/<folder>``, an output or written folder of an earlier step,
            e.g. {data.features_dir: stage1/features}.
    """

    name: str
    config: str | list[str]
    kind: str = "stage"
    args: list[str] = field(default_factory=list)
    output: str | None = None
    writes: dict[str, str] = field(default_factory=dict)
    reads: dict[str, str] = field(default_factory=dict)

    def configs(self) -> list[str]:
        """The step's YAMLs, in the order they are layered."""
        return [self.config] if isinstance(self.config, str) else list(self.config)

    def folders(self) -> dict[str, str]:
        """The folders this step writes that later steps may read: name → the key that sets it."""
        model = {MODEL_FOLDER: None} if self.kind == "qanchor" else {}
        return {**({self.output: "model.predict_dir"} if self.output else {}), **model, **self.writes}


@dataclass
class PipelineConfig:
    """What the pipeline runs.

    Args:
        run_dir: the run folder; each step writes into ``<run_dir>/<step name>/``.
        data: the data config (a YAML with a ``data:`` section), the first ``--config`` of every step;
            or a list of YAMLs layered in order (a data set's config, then a small file holding what
            this pipeline changes, such as ``data.fit_users``).
        steps: the steps, in order (see :class:`Step`).
        trainer_args: extra flags for every stage's fit and predict, e.g. ["--trainer.devices", "2"].
        on_change: what to do when a step's folder was made with another fingerprint (its
            config, flags, inputs or code differ from this run's): ``error`` (stop and say which
            steps and what changed; nothing is touched) or ``restart`` (remove those steps'
            folders and run them again; the others are kept). Complete steps whose fingerprint
            matches are always skipped.
    """

    run_dir: str
    data: str | list[str]
    steps: list[Step]
    trainer_args: list[str] = field(default_factory=list)
    on_change: str = "error"


# ------------------------------------------------------------------------------ declared steps
def parse_config(args: list[str], prog: str = "", description: str = "") -> PipelineConfig:
    """``--config pipeline.yaml`` (a ``pipeline:`` section) and ``--pipeline.*`` flags → the config, validated."""
    from jsonargparse import ActionConfigFile, ArgumentParser

    parser = ArgumentParser(prog=prog, description=description, default_meta=False)
    parser.add_argument("--config", action=ActionConfigFile, help="a YAML file with a `pipeline:` section")
    parser.add_class_arguments(PipelineConfig, "pipeline")
    cfg = parser.instantiate_classes(parser.parse_args(args)).pipeline
    validate(cfg)
    return cfg


def validate(cfg: PipelineConfig) -> None:
    """Every step well formed; every read names a folder of an earlier step."""
    if cfg.on_change not in ("error", "restart"):
        raise DataError(f"pipeline.on_change must be 'error' or 'restart', got {cfg.on_change!r}.")
    if not cfg.steps:
        raise DataError("pipeline.steps is empty: declare at least one step.")
    earlier: dict[str, Step] = {}
    for step in cfg.steps:
        where = f"pipeline step {step.name!r}"
        if not re.fullmatch(r"[A-Za-z0-9_.-]+", step.name) or step.name in earlier:
            raise DataError(f"{where}: a step name must be unique and a plain folder name (letters, digits, _ . -).")
        if not step.configs():
            raise DataError(f"{where}: config is an empty list: give its YAML, or YAMLs to layer.")
        if step.kind not in KIND_CODE:
            raise DataError(f"{where}: kind must be one of {sorted(KIND_CODE)}, got {step.kind!r}.")
        if step.kind in STAGE_KINDS and not step.output:
            raise DataError(f"{where}: a stage step needs an output (the folder its predict writes).")
        if step.kind == "qanchor" and MODEL_FOLDER in {step.output, *step.writes}:
            raise DataError(f"{where}: a qanchor step writes its checkpoint into {MODEL_FOLDER!r}; name its output "
                            "and written folders otherwise.")
        if step.kind == "bench" and (step.output or step.writes):
            raise DataError(f"{where}: a bench step writes only its own folder; drop output and writes.")
        for key, ref in step.reads.items():
            src, _, folder = ref.partition("/")
            if src not in earlier or folder not in earlier[src].folders():
                known = [f"{s}/{f}" for s, st in earlier.items() for f in st.folders()]
                raise DataError(f"{where}: reads {key} from {ref!r}, which no earlier step writes "
                                f"(earlier steps write: {', '.join(known) or 'nothing'}).")
        earlier[step.name] = step


def _path(run: Path, ref: str) -> Path:
    src, _, folder = ref.partition("/")
    return run / src / folder


def step_args(cfg: PipelineConfig, step: Step, run: Path) -> list[str]:
    """The arguments the step's fit, predict or bench is built from: the data config, the step's
    config, the folders it writes and reads, then its own flags (last, so they win)."""
    folder = run / step.name
    args = [a for c in (*data_configs(cfg), *step.configs()) for a in ("--config", c)]
    if step.kind in STAGE_KINDS:
        args += ["--trainer.default_root_dir", str(folder), "--trainer.logger.init_args.save_dir", str(folder),
                 *cfg.trainer_args]
        for name, key in step.writes.items():
            args += [f"--{key}", str(folder / name)]
    else:
        args += ["--bench.output_dir", str(folder)]
    for key, ref in step.reads.items():
        args += [f"--{key}", str(_path(run, ref))]
    return args + list(step.args)


# ------------------------------------------------------------------------------ fingerprints
def module_imports(source: str | bytes, module: str = "", is_package: bool = False) -> set[str]:
    """The modules a source file imports, at any depth (inside functions too), with ``from a
    import b`` counted as both ``a`` and ``a.b`` (b may be a submodule); relative imports are
    resolved against ``module``."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                pkg = module.split(".") if is_package else module.split(".")[:-1]
                pkg = pkg[: len(pkg) - node.level + 1]
                base = ".".join(pkg + ([node.module] if node.module else []))
            names.add(base)
            names.update(f"{base}.{a.name}" for a in node.names)
    return names


def _module_file(name: str, root: Path) -> Path | None:
    if name.split(".")[0] not in PACKAGES:
        return None
    base = root.joinpath(*name.split("."))
    return next((p for p in (base.with_suffix(".py"), base / "__init__.py") if p.is_file()), None)


def code_closure(modules: list[str] | tuple[str, ...], root: Path = REPO) -> dict[str, str]:
    """``path → sha256`` of every repo module reachable from ``modules`` through the imports each
    one names (:func:`module_imports`). A package's ``__init__`` counts where it is imported by
    name (``from foundv2.nn import X``), not merely because a submodule of it is: so stage 1,
    which imports ``foundv2.nn.qformer``, does not depend on ``foundv2/nn/quantizer.py``."""
    hashes: dict[str, str] = {}
    todo = list(modules)
    while todo:
        name = todo.pop()
        path = _module_file(name, root)
        if path is None or (rel := path.relative_to(root).as_posix()) in hashes:
            continue
        source = path.read_bytes()
        hashes[rel] = hashlib.sha256(source).hexdigest()
        todo.extend(module_imports(source, name, path.name == "__init__.py"))
    return dict(sorted(hashes.items()))


def _class_path_modules(node) -> list[str]:
    if isinstance(node, dict):
        found = [m for v in node.values() for m in _class_path_modules(v)]
        cp = node.get("class_path")
        if isinstance(cp, str) and cp.split(".")[0] in PACKAGES:
            found.append(cp.rsplit(".", 1)[0])
        return found
    if isinstance(node, list):
        return [m for v in node for m in _class_path_modules(v)]
    return []


def _read_config(path: str, where: str) -> bytes:
    """A config as its parsed content in canonical JSON (sorted keys): what a step's fingerprint
    hashes, so comments, key order and formatting never make a finished step run again."""
    try:
        parsed = yaml.safe_load(Path(path).read_text())
    except OSError as err:
        raise DataError(f"{where}: cannot read its config {path} ({err.strerror}).") from None
    except yaml.YAMLError as err:
        raise DataError(f"{where}: its config {path} is not valid YAML ({str(err).splitlines()[0]}).") from None
    return json.dumps(parsed, sort_keys=True, separators=(",", ":")).encode()


def data_configs(cfg: PipelineConfig) -> list[str]:
    """The pipeline's data YAMLs, in the order they are layered."""
    return [cfg.data] if isinstance(cfg.data, str) else list(cfg.data)


def _layered_digest(texts: list[bytes]) -> str:
    """One digest of layered configs (each canonical JSON, in order)."""
    return hashlib.sha256(b"\n".join(texts)).hexdigest()


def step_fingerprint(cfg: PipelineConfig, step: Step, upstream: dict[str, str], root: Path = REPO) -> dict:
    """What a step's results depend on. ``upstream``: step name → digest of its fingerprint."""
    where = f"pipeline step {step.name!r}"
    data = [_read_config(c, where) for c in data_configs(cfg)]
    own = [_read_config(c, where) for c in step.configs()]
    entry = list(KIND_CODE[step.kind])
    if step.kind in STAGE_KINDS:
        entry += [m for text in own for m in _class_path_modules(json.loads(text))]
    fp = {
        "config": {"data": _layered_digest(data), "step": _layered_digest(own)},
        "flags": {"kind": step.kind, "args": step.args, "output": step.output, "writes": step.writes,
                  "trainer_args": cfg.trainer_args if step.kind in STAGE_KINDS else []},
        "reads": {key: {"from": ref, "fingerprint": upstream[ref.partition("/")[0]]} for key, ref in step.reads.items()},
        "code": code_closure(entry, root),
    }
    return json.loads(json.dumps(fp))  # as it reads back from disk


def digest(fp: dict) -> str:
    return hashlib.sha256(json.dumps(fp, sort_keys=True).encode()).hexdigest()


def fingerprints(cfg: PipelineConfig, root: Path = REPO) -> dict[str, dict]:
    """Every step's fingerprint, in order (each read step's digest feeds the next)."""
    out: dict[str, dict] = {}
    for step in cfg.steps:
        out[step.name] = step_fingerprint(cfg, step, {n: digest(fp) for n, fp in out.items()}, root)
    return out


def what_changed(cfg: PipelineConfig, step: Step, before: dict | None, now: dict) -> str:
    """One phrase: why a step's recorded fingerprint differs from this run's."""
    if not before:
        return f"no {FINGERPRINT} says what made it"
    why = []
    old = before.get("config", {})
    names = {"data": " + ".join(data_configs(cfg)), "step": " + ".join(step.configs())}
    if changed := [names[k] for k in names if old.get(k) != now["config"][k]]:
        why.append(f"config {', '.join(changed)}")
    if before.get("flags") != now["flags"]:
        why.append("flags")
    old_reads = before.get("reads", {})
    if inputs := sorted({r["from"].partition("/")[0] for k, r in now["reads"].items() if old_reads.get(k) != r}
                        | {r["from"].partition("/")[0] for k, r in old_reads.items() if k not in now["reads"]}):
        why.append(f"input {', '.join(inputs)}")
    old_code = before.get("code", {})
    if code := sorted(p for p in set(old_code) | set(now["code"]) if old_code.get(p) != now["code"].get(p)):
        why.append(f"code {', '.join(code[:3])}{' and more' if len(code) > 3 else ''}")
    return "made with other " + " and ".join(why) if why else "made with another fingerprint"


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def check_run_folder(cfg: PipelineConfig, run: Path, root: Path = REPO) -> dict[str, str]:
    """Compare each existing step folder's fingerprint with this run's and act on ``on_change``;
    then record every step's fingerprint (rank 0; other ranks wait for it). Returns the changed
    steps (name → what changed)."""
    now = fingerprints(cfg, root)
    changed = {}
    for step in cfg.steps:
        folder = run / step.name
        before = _read_json(folder / FINGERPRINT)
        if not folder.exists():
            continue
        if before != now[step.name]:
            changed[step.name] = what_changed(cfg, step, before, now[step.name])
        elif rerun := sorted({ref.partition("/")[0] for ref in step.reads.values()} & set(changed)):
            changed[step.name] = f"an input that is rerun ({', '.join(rerun)})"  # it read their old outputs
    # restart removes only folders the pipeline made (its fingerprint.json in them): never a user's
    foreign = [name for name in changed if not (run / name).is_dir() or not isinstance(
        _read_json(run / name / FINGERPRINT), dict)]
    if changed and cfg.on_change == "error":
        listing = "; ".join(f"{name}: {why}" for name, why in changed.items())
        kept = [s.name for s in cfg.steps if s.name not in changed and (run / s.name).exists()]
        theirs = (f" ({', '.join(str(run / n) for n in foreign)} not made by the pipeline: restart leaves "
                  f"{'it' if len(foreign) == 1 else 'them'}, move {'it' if len(foreign) == 1 else 'them'} away "
                  f"yourself)") if foreign else ""
        raise DataError(
            f"{run}: the step folders {', '.join(changed)} do not match this run ({listing}); skipping them could report stale results. Pass --pipeline.on_change restart to "
            f"remove and rerun only these steps{' (' + ', '.join(kept) + ' kept)' if kept else ''}{theirs}, "
            f"use a new pipeline.run_dir, or delete those folders."
        )
    if foreign:
        where = ", ".join(str(run / n) for n in foreign)
        raise DataError(
            f"{where}: in the way of pipeline step{'s' if len(foreign) > 1 else ''} {', '.join(foreign)}, and not "
            f"made by the pipeline (no {FINGERPRINT} in it), so --pipeline.on_change restart does not delete it; "
            f"nothing was removed. Move it away (or delete it yourself), or use a new pipeline.run_dir."
        )
    if _is_rank_zero():
        for name, why in changed.items():
            _say(f"{name}: {why}: removing {run / name} to run it again")
            shutil.rmtree(run / name)
        for name, fp in now.items():
            atomic_write_json(run / name / FINGERPRINT, fp)
        return changed
    # other ranks (torchrun starts the pipeline on each) go on once rank 0 has cleaned up
    deadline = time.monotonic() + FINGERPRINT_WAIT_S
    while any(_read_json(run / name / FINGERPRINT) != fp for name, fp in now.items()):
        if time.monotonic() > deadline:
            raise DataError(f"{run}: rank 0 did not record this run's fingerprints within {FINGERPRINT_WAIT_S} s.")
        time.sleep(0.2)
    return changed


# ------------------------------------------------------------------------------ running
def _is_rank_zero() -> bool:
    return int(os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0"))) == 0


def _say(msg: str) -> None:
    if _is_rank_zero():
        print(f"[pipeline] {msg}", flush=True)


def _run_stage(step: Step, folder: Path, args: list[str]) -> bool:
    """Fit (unless done) then predict (unless complete). True when anything ran."""
    ran = False
    if (folder / launch.FIT_DONE).exists():
        _say(f"  fit: done before ({folder / launch.FIT_DONE}), skipped")
    else:
        launch.fit_stage(args, folder, say=_say, quiet=True)
        ran = True
    out = folder / step.output
    if output_is_complete(out):
        _say(f"  predict: {out} complete, skipped")
    else:
        launch.predict_stage(args + ["--trainer.logger", "false", "--model.predict_dir", str(out)], folder, quiet=True)
        ran = True
    return ran


def _put_model(folder: Path) -> bool:
    """A qanchor step: its best (else last) checkpoint, with its checksum record, into
    ``<folder>/model/`` (hard links where the file system allows, else copies), atomically; rank 0.
    True when it was put there now."""
    from data_modules.store import atomic_dir, sidecar
    from foundv2.bench.qanchor import CHECKPOINT_NAME

    out = folder / MODEL_FOLDER
    if not _is_rank_zero():
        return False
    if (out / CHECKPOINT_NAME).is_file():
        _say(f"  model: {out} complete, skipped")
        return False
    ckpt = launch.best_or_last_checkpoint(folder)
    with atomic_dir(out) as tmp:
        for src, dst in ((ckpt, tmp / CHECKPOINT_NAME), (sidecar(ckpt), sidecar(tmp / CHECKPOINT_NAME))):
            if src.exists():
                try:
                    os.link(src, dst)
                except OSError:
                    shutil.copy2(src, dst)
    _say(f"  model: {ckpt.name} put into {out}")
    return True


def _run_bench(folder: Path, args: list[str]) -> bool:
    if not _is_rank_zero():
        return False
    if (folder / BENCH_DONE).exists():
        _say(f"  bench: {folder / BENCH_DONE} exists, skipped")
        return False
    from foundv2.bench.run import run_bench

    launch.run_with_data(run_bench, "bench", args)
    return True


def run_pipeline(cfg: PipelineConfig, root: Path = REPO) -> dict:
    """Run every step that is not complete with this run's fingerprint; print the bench table.
    ``root``: the repository whose modules the code fingerprints hash. Returns ``{"timings":
    step → seconds (and total), "ran": [steps that did work], "skipped": [steps already complete]}``."""
    validate(cfg)
    run = Path(cfg.run_dir)
    fix = "point pipeline.run_dir at a folder you can write, or fix its permissions"
    for folder in [run, *(run / s.name for s in cfg.steps if (run / s.name).exists())]:
        check_writable(folder, "pipeline run", fix)
    run.mkdir(parents=True, exist_ok=True)
    check_run_folder(cfg, run, root)
    t_all = time.perf_counter()
    timings: dict[str, float] = {}
    ran, skipped = [], []
    bench_dirs = []
    for k, step in enumerate(cfg.steps, 1):
        t0 = time.perf_counter()
        folder, args = run / step.name, step_args(cfg, step, run)
        log = folder / console.step_log_name()
        _say(f"[{k}/{len(cfg.steps)}] {step.name}: {' + '.join(step.configs())} (log: {log})")
        with console.log_to_file(log):
            if step.kind in STAGE_KINDS:
                did = _run_stage(step, folder, args)
                if step.kind == "qanchor":
                    did = _put_model(folder) or did
            else:
                did = _run_bench(folder, args)
                bench_dirs.append(folder)
        (ran if did else skipped).append(step.name)
        timings[step.name] = time.perf_counter() - t0
        _say(f"[{k}/{len(cfg.steps)}] {step.name}: {'finished' if did else 'skipped'} in {timings[step.name]:.0f}s")
    timings["total"] = time.perf_counter() - t_all
    if _is_rank_zero():
        atomic_write_json(run / "timings.json", timings)
        for folder in bench_dirs:
            from foundv2.bench.report import table

            print("\n" + table(json.loads((folder / BENCH_DONE).read_text())), flush=True)
            _say(f"report: {folder / 'report.md'}")
        _say(f"all steps done in {timings['total']:.0f}s")
    return {"timings": timings, "ran": ran, "skipped": skipped}
