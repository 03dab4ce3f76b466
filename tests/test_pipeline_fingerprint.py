"""Per-step fingerprints: each step depends on its configs, flags, inputs and its own code only."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace

import pytest
import yaml

from data_modules.schema import DataError
from foundv2.pipeline import (
    FINGERPRINT,
    REPO,
    Step,
    check_run_folder,
    code_closure,
    digest,
    fingerprints,
    module_imports,
    parse_config,
    validate,
)
from tests.helpers import ROOT, run_cli

SHIPPED = ROOT / "experiments" / "movielens-100k" / "pipeline.yaml"


def _digests(cfg, root=REPO) -> dict[str, str]:
    return {name: digest(fp) for name, fp in fingerprints(cfg, root).items()}


@pytest.fixture
def shipped(monkeypatch):
    monkeypatch.chdir(ROOT)
    return parse_config(["--config", str(SHIPPED)])


@pytest.fixture
def src(tmp_path):
    """A copy of the repository's packages that a test may edit."""
    for pkg in ("foundv2", "data_modules"):
        shutil.copytree(REPO / pkg, tmp_path / "src" / pkg, ignore=shutil.ignore_patterns("__pycache__"))
    return tmp_path / "src"


def test_each_step_hashes_only_the_code_it_imports(shipped):
    fps = fingerprints(shipped)
    stage1, tokenizer, bench = (set(fps[s]["code"]) for s in ("stage1", "tokenizer", "bench"))
    assert "foundv2/stages/qformer.py" in stage1 and "foundv2/nn/qformer.py" in stage1
    assert "foundv2/nn/quantizer.py" not in stage1 and "foundv2/nn/quantizer.py" in tokenizer
    assert not any(p.startswith("foundv2/bench/") for p in stage1 | tokenizer)
    assert {"foundv2/bench/report.py", "foundv2/bench/run.py", "foundv2/launch.py"} <= bench
    assert "data_modules/prepare.py" in stage1 & tokenizer & bench  # the data code feeds every step
    assert "foundv2/pipeline.py" not in stage1 | tokenizer | bench and "foundv2/cli.py" not in bench


@pytest.mark.parametrize("edited, rerun", [
    ("foundv2/bench/report.py", {"bench"}),
    ("foundv2/nn/quantizer.py", {"tokenizer", "bench"}),
    ("foundv2/stages/qformer.py", {"stage1", "tokenizer", "bench"}),  # the later steps read stage 1
    ("data_modules/prepare.py", {"stage1", "tokenizer", "bench"}),
    ("foundv2/pipeline.py", set()),  # wiring is in the flags and reads, not in the steps' code
])
def test_a_code_edit_changes_the_steps_that_run_it_and_those_that_read_them(shipped, src, edited, rerun):
    before = _digests(shipped, src)
    assert before == _digests(shipped)  # the copy is the same code
    path = src / edited
    path.write_text(path.read_text() + "\n# a comment\n")
    after = _digests(shipped, src)
    assert {name for name in before if before[name] != after[name]} == rerun


def test_flags_and_configs_change_the_step_and_the_steps_that_read_it(shipped, tmp_path):
    before = _digests(shipped)
    steps = [replace(s, args=[*s.args, "--model.beta", "0.5"]) if s.name == "tokenizer" else s for s in shipped.steps]
    after = _digests(replace(shipped, steps=steps))
    assert {n for n in before if before[n] != after[n]} == {"tokenizer", "bench"}
    data = tmp_path / "data.yaml"
    parsed = yaml.safe_load((ROOT / shipped.data).read_text())
    parsed["data"]["batch_size"] = parsed["data"].get("batch_size", 32) + 1
    data.write_text(yaml.safe_dump(parsed))
    after = _digests(replace(shipped, data=str(data)))
    assert all(before[n] != after[n] for n in before)  # the data config is every step's config
    flags = {n: fp["flags"] for n, fp in fingerprints(shipped).items()}
    trainer = {n: fp["flags"] for n, fp in fingerprints(replace(shipped, trainer_args=["--trainer.devices", "2"])).items()}
    assert flags["stage1"] != trainer["stage1"] and flags["bench"] == trainer["bench"]  # the bench has no trainer


def test_comments_key_order_and_formatting_of_a_config_never_rerun_a_step(shipped, tmp_path):
    """A step's fingerprint hashes its configs as parsed, not their bytes: a comment, another key
    order or another YAML style of the same values changes nothing; a value does."""
    before = _digests(shipped)
    tok = next(s for s in shipped.steps if s.name == "tokenizer")
    parsed = yaml.safe_load((ROOT / tok.config).read_text())
    restyled = tmp_path / "restyled.yaml"
    restyled.write_text("# a comment that says nothing new\n"
                        + yaml.safe_dump(dict(reversed(list(parsed.items()))), default_flow_style=True, width=60))
    steps = [replace(s, config=str(restyled)) if s is tok else s for s in shipped.steps]
    assert _digests(replace(shipped, steps=steps)) == before
    parsed.setdefault("seed_everything", 0)
    parsed["seed_everything"] += 1
    restyled.write_text(yaml.safe_dump(parsed))
    after = _digests(replace(shipped, steps=steps))
    assert {n for n in before if before[n] != after[n]} == {"tokenizer", "bench"}


def test_a_step_of_layered_configs_passes_them_in_order_and_hashes_each(shipped, tmp_path):
    """``config: [a.yaml, b.yaml]``: both are --config flags in that order (the later wins), an
    edit of either changes the step and those reading it, and a one-item list is the single YAML."""
    from foundv2.pipeline import step_args

    tok = next(s for s in shipped.steps if s.name == "tokenizer")
    layer = tmp_path / "layer.yaml"
    layer.write_text("model:\n  init_args:\n    code_dim: 32\n")
    layered = [replace(s, config=[s.config, str(layer)]) if s is tok else s for s in shipped.steps]
    args = step_args(replace(shipped, steps=layered), next(s for s in layered if s.name == "tokenizer"), tmp_path / "run")
    assert args[:6] == ["--config", shipped.data, "--config", tok.config, "--config", str(layer)]
    before = _digests(replace(shipped, steps=layered))
    layer.write_text("model:\n  init_args:\n    code_dim: 16\n")
    after = _digests(replace(shipped, steps=layered))
    assert {n for n in before if before[n] != after[n]} == {"tokenizer", "bench"}
    single = [replace(s, config=[s.config]) if s is tok else s for s in shipped.steps]
    assert _digests(replace(shipped, steps=single)) == _digests(shipped)
    with pytest.raises(DataError, match="empty list"):
        validate(replace(shipped, steps=[replace(s, config=[]) if s is tok else s for s in shipped.steps]))


def test_module_imports_resolve_relative_and_submodule_imports():
    src = "from . import report\nfrom ..nn.quantizer import X\nimport foundv2.io\ndef f():\n    from data_modules import store\n"
    found = module_imports(src, "foundv2.bench.run")
    assert {"foundv2.bench.report", "foundv2.nn.quantizer", "foundv2.io", "data_modules.store"} <= found
    closure = code_closure(["foundv2.nn.mrqvae"])
    assert "foundv2/nn/quantizer.py" in closure and "foundv2/nn/__init__.py" not in closure


@pytest.mark.parametrize("steps, message", [
    ([Step("a", "x.yaml", output="o"), Step("a", "y.yaml", output="o")], "unique"),
    ([Step("a", "x.yaml")], "needs an output"),
    ([Step("a", "x.yaml", output="o", reads={"data.features_dir": "b/o"}), Step("b", "y.yaml", output="o")],
     "reads data.features_dir from 'b/o', which no earlier step writes"),
    ([Step("a", "x.yaml", output="o"), Step("b", "y.yaml", kind="bench", reads={"bench.tokens_dir": "a/p"})],
     r"earlier steps write: a/o"),
    ([Step("a", "x.yaml", kind="eval")], "kind must be one of"),
    ([Step("a/b", "x.yaml", output="o")], "plain folder name"),
])
def test_malformed_steps_are_clear_errors(shipped, steps, message):
    with pytest.raises(DataError, match=message):
        validate(replace(shipped, steps=steps))


def test_fingerprints_are_recorded_per_step_and_a_changed_config_is_named(shipped, tmp_path):
    own = tmp_path / "bench.yaml"
    own.write_text((ROOT / "experiments/movielens-100k/bench.yaml").read_text())
    steps = [replace(s, config=str(own)) if s.name == "bench" else s for s in shipped.steps]
    cfg = replace(shipped, run_dir=str(tmp_path / "run"), steps=steps)
    run = tmp_path / "run"
    assert check_run_folder(cfg, run) == {}
    fps = fingerprints(cfg)
    assert all(json.loads((run / n / FINGERPRINT).read_text()) == fps[n] for n in fps)
    own.write_text(own.read_text() + "  seed: 1\n")
    with pytest.raises(DataError, match=rf"bench: made with other config {own}"):
        check_run_folder(cfg, run)


def test_cli_reports_a_stale_folder_without_traceback(tmp_path):
    run = tmp_path / "run"
    (run / "stage1").mkdir(parents=True)  # no fingerprint.json: nothing says what made it
    conf = tmp_path / "pipe.yaml"
    conf.write_text(json.dumps({"pipeline": {**yaml_section(SHIPPED), "run_dir": str(run)}}))
    res = run_cli("pipeline", "--config", str(conf), check=False)
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert "stage1: no fingerprint.json says what made it" in res.stderr and "on_change restart" in res.stderr
    assert (run / "stage1").exists() and not (run / "tokenizer").exists()


def yaml_section(path) -> dict:
    import yaml

    return yaml.safe_load(path.read_text())["pipeline"]
