"""Preparation says what it did: a data set where most users lose their whole history to the
future is prepared, but ``foundv2 data`` and the bench report say so with the likely fix."""

from __future__ import annotations

import pandas as pd
import yaml

from tests.helpers import ROOT, run_cli

EXAMPLE = ROOT / "experiments" / "files-example"


def _lopsided_copy(tmp_path):
    """The worked example with 70 % of its users cut to their first event (which the 20 % future
    then takes whole), and its data config pointed at the copy."""
    ev = pd.read_csv(EXAMPLE / "events.csv")
    users = sorted(ev["user_id"].unique())
    cut = set(users[: int(0.7 * len(users))])
    first = ev.groupby("user_id").head(1)
    ev = pd.concat([first[first["user_id"].isin(cut)], ev[~ev["user_id"].isin(cut)]]).sort_values(
        ["user_id", "timestamp"], kind="stable")
    ev.to_csv(tmp_path / "events.csv", index=False)
    cfg = yaml.safe_load((EXAMPLE / "data.yaml").read_text())
    cfg["data"]["loader_args"].update(events=str(tmp_path / "events.csv"), users=str(EXAMPLE / "users.csv"))
    cfg["data"].update(cache_dir=str(tmp_path / "cache"), progress=False)
    path = tmp_path / "data.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path, len(cut), len(users)


def test_most_users_without_history_are_said_with_the_fix(tmp_path):
    data, cut, n = _lopsided_copy(tmp_path)
    res = run_cli("data", "--config", str(data))
    warning = [line for line in res.stdout.splitlines() if line.startswith("warning:")]
    assert len(warning) == 1, res.stdout
    assert f"({cut:,} of {n:,}) have no history window" in warning[0] and "`future_frac: 0`" in warning[0]
    quiet = run_cli("data", "--config", str(data), "--data.warn_no_history", "1")
    assert "warning:" not in quiet.stdout and "no history window" not in quiet.stdout

    out = tmp_path / "bench"
    run_cli("bench", "--config", str(data), "--bench.output_dir", str(out), "--bench.tokens_dir", "null",
            "--bench.tokenizer_dir", "null", "--bench.baselines", "[majority]", "--bench.representations", "[pooled]",
            "--bench.progress", "false", "--bench.probe_epochs", "2")
    report = (out / "report.md").read_text()
    assert "have no history window" in report and "`future_frac: 0`" in report
