"""Every shipped YAML parses against its entry point; the small ones run one step."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from tests.helpers import ROOT, run_cli

CONFIGS = sorted(p for p in (ROOT / "experiments").rglob("*.yaml"))


def _stage_data_keys() -> set[str]:
    from data_modules.datamodule import BATCH_KINDS

    return {k.input_arg for k in BATCH_KINDS.values() if k.input_arg} | {"questions"}


#: the data keys a stage YAML may set: what its batches are, not what the data is
STAGE_DATA_KEYS = _stage_data_keys()


def _kind(path: Path) -> str:
    cfg = yaml.safe_load(path.read_text())
    if "pipeline" in cfg:
        return "pipeline"
    if "bench" in cfg:
        return "bench"
    if "model" in cfg:
        return "lightning"
    return "data"


def test_every_config_starts_with_the_command_that_runs_it():
    assert CONFIGS
    for p in CONFIGS:
        head = p.read_text().splitlines()[:6]
        assert head[0].startswith("#"), p
        assert any("foundv2 " in line for line in head), f"{p}: no command in the header comment"


def _with_data(path: Path) -> list[str]:
    """A stage or bench YAML runs after its folder's one data config."""
    data = path.parent / "data.yaml"
    return (["--config", str(data)] if data.exists() and data != path else []) + ["--config", str(path)]


def test_stage_and_bench_configs_hold_no_data_section():
    """The data config lives once per data-set folder (data.yaml); stage YAMLs do not repeat it.
    A stage YAML may only name what its batches are: the input dataset it reads (a batch kind's
    input folder) or, for Q-Anchor, the question/answer pairs it trains on."""
    inputs = STAGE_DATA_KEYS
    for p in CONFIGS:
        if _kind(p) in ("lightning", "bench"):
            assert set(yaml.safe_load(p.read_text()).get("data") or {}) <= inputs, p
            assert (p.parent / "data.yaml").exists(), p
            assert f"--config {p.parent.relative_to(ROOT).as_posix()}/data.yaml" in p.read_text(), \
                f"{p}: the header command should pass the folder's data.yaml first"


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: str(p.relative_to(ROOT / "experiments")))
def test_config_parses(path, tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    kind = _kind(path)
    if kind == "lightning":
        from foundv2.launch import lightning_cli

        # the GPU configs are parsed in full; only the trainer is placed on this CPU to instantiate it
        cli = lightning_cli([*_with_data(path), "--trainer.default_root_dir", str(tmp_path),
                             "--trainer.accelerator", "cpu", "--trainer.precision", "32-true"], run=False)
        assert cli.model is not None and cli.datamodule is not None
        assert cli.datamodule.hparams.dataset == yaml.safe_load((path.parent / "data.yaml").read_text())["data"]["dataset"]
    elif kind == "pipeline":
        from foundv2.pipeline import parse_config

        cfg = parse_config(["--config", str(path)])  # validated: every read names an earlier step's folder
        from foundv2.pipeline import data_configs

        for conf in (*data_configs(cfg), *(c for s in cfg.steps for c in s.configs())):
            assert (ROOT / conf).exists(), conf
    else:
        from foundv2.bench.run import run_bench
        from foundv2.launch import data_parser, function_parser

        parser = function_parser(run_bench, "bench") if kind == "bench" else data_parser()
        cfg = parser.parse_args(_with_data(path))
        assert parser.instantiate_classes(cfg).data is not None


PIPELINES = [p for p in CONFIGS if _kind(p) == "pipeline"]


@pytest.mark.parametrize("path", PIPELINES, ids=lambda p: str(p.relative_to(ROOT / "experiments")))
def test_every_step_of_a_pipeline_sees_the_same_data_config(path, tmp_path, monkeypatch):
    """What each step would really instantiate: the stages' DataModule (LightningCLI from the
    step's arguments) and the bench's, equal but for the keys a step reads from earlier steps."""
    from dataclasses import replace

    from foundv2.bench.run import run_bench
    from foundv2.launch import function_parser, lightning_cli
    from foundv2.pipeline import data_configs, parse_config, step_args

    monkeypatch.chdir(ROOT)
    cfg = parse_config(["--config", str(path)])
    cfg = replace(cfg, run_dir=str(tmp_path))
    read = {k.removeprefix("data.") for s in cfg.steps for k in s.reads if k.startswith("data.")}
    read |= {"questions"}  # Q-Anchor's training batches, set by its stage YAML
    seen = {}
    for step in cfg.steps:
        args = step_args(cfg, step, tmp_path)
        if step.kind != "bench":
            data = dict(lightning_cli([*args, "--trainer.accelerator", "cpu"], run=False).datamodule.hparams)
        else:
            data = function_parser(run_bench, "bench").parse_args(args).data.as_dict()
        # inputs from earlier steps differ by design; LightningCLI adds its own `_instantiator`
        seen[step.name] = {k: v for k, v in data.items() if k not in read and not k.startswith("_")}
    first = next(iter(seen.values()))
    assert len(seen) == len(cfg.steps) and first["dataset"] == yaml.safe_load(Path(data_configs(cfg)[0]).read_text())["data"]["dataset"]
    for name, data in seen.items():
        assert data == first, (name, {k: (first.get(k), data.get(k)) for k in first.keys() | data.keys()
                                      if first.get(k) != data.get(k)})


@pytest.mark.parametrize("name", ["synthetic/tokenizer.yaml", "synthetic/qformer.yaml", "synthetic/qanchor.yaml"])
def test_small_configs_run_one_step(name, tmp_path):
    run_cli("fit", *_with_data(ROOT / "experiments" / name), "--trainer.fast_dev_run", "1",
            "--trainer.default_root_dir", str(tmp_path), "--trainer.logger", "false",
            "--data.cache_dir", str(tmp_path / "cache"), "--data.loader_args", '{"n_users": 300, "seed": 0}',
            "--data.progress", "false")
