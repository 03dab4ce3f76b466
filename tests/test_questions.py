"""Query/answer pairs from the data (data_modules/questions.py), on a real prepared synthetic set."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from data_modules.datamodule import UserDataModule
from data_modules.questions import (
    DAY_PARTS,
    DEFAULT_QUESTIONS,
    Question,
    build_pairs,
    load_pairs,
    questions_from_config,
)
from data_modules.schema import DataError
from data_modules.store import Split


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> Path:
    dm = UserDataModule(dataset="synthetic", loader_args={"n_users": 300, "seed": 2}, window_mode="day",
                        text_encoder="hashing", cache_dir=str(tmp_path_factory.mktemp("qa") / "cache"), progress=False)
    dm.prepare_data()
    return dm.prepared_dir


def _parts(folder: Path):
    import json

    meta = json.loads((folder / "meta.json").read_text())
    table = pa.concat_tables([pa.ipc.open_stream(folder / s).read_all() for s in meta["shards"]])
    texts = pa.ipc.open_stream(folder / "texts.arrow").read_all()["text"].to_pylist()
    return table, meta, texts


def _with_column(table: pa.Table, name: str, values: list) -> pa.Table:
    return table.set_column(table.schema.get_field_index(name), name, pa.array(values, table.schema.field(name).type))


def test_every_default_question_is_answered_for_training_users_only(prepared):
    pairs = load_pairs(prepared)
    table, _, _ = _parts(prepared)
    split = table["split"].to_numpy()
    assert len(pairs) > 0 and set(split[pairs.row]) == {int(Split.TRAIN)}
    counts = pairs.counts()
    assert counts["future"] == int((split == Split.TRAIN).sum())  # every training user has a summary
    assert all(counts[q.name] > 0 for q in DEFAULT_QUESTIONS), (counts, pairs.skipped)
    assert len(pairs.answer) == len(pairs.row) == len(pairs.question)


def test_val_and_test_users_change_nothing(prepared):
    """Rewriting every validation/test user's history (values scaled up 1000x, all at one hour)
    leaves every pair identical: bins are fitted on training users only."""
    table, meta, texts = _parts(prepared)
    before = build_pairs(table, meta, texts, DEFAULT_QUESTIONS)
    split = table["split"].to_numpy()
    values, times = table["h_value"].to_pylist(), table["h_time"].to_pylist()
    for r in np.flatnonzero(split != Split.TRAIN):
        values[r] = [v * 1000 + 7 for v in values[r]]
        times[r] = [t - t % 86400 + 3600 for t in times[r]]
    other = _with_column(_with_column(table, "h_value", values), "h_time", times)
    after = build_pairs(other, meta, texts, DEFAULT_QUESTIONS)
    assert after.answer == before.answer and np.array_equal(after.row, before.row)


def test_validation_pairs_are_answered_with_the_training_users_bins(prepared):
    """Validation users' activity answers sit in the terciles of the *training* users' counts,
    and asking for them changes no training answer."""
    table, meta, texts = _parts(prepared)
    qs = [Question("act", "q", "activity")]
    split = table["split"].to_numpy()
    val = np.flatnonzero(split == Split.VAL)
    train_pairs = build_pairs(table, meta, texts, qs)
    held = build_pairs(table, meta, texts, qs, answer_rows=np.concatenate([val, np.flatnonzero(split == Split.TRAIN)]))
    assert len(held) > 0 and set(split[held.row]) == {int(Split.VAL)}  # training rows are never answered here
    n_train = np.array([len(table["h_source"][int(r)]) for r in train_pairs.row])
    edges = np.quantile(n_train[n_train > 0], [1 / 3, 2 / 3])
    levels = ("Low", "Medium", "High")
    for r, a in zip(held.row, held.answer, strict=True):
        n = len(table["h_source"][int(r)])
        assert a == f"{levels[int(np.searchsorted(edges, n, side='right'))]} activity: {n} events."
    assert build_pairs(table, meta, texts, qs).answer == train_pairs.answer


def test_answers_match_a_direct_count(prepared):
    """Favourite categories and time of day, recounted by hand for a few training users."""
    table, meta, texts = _parts(prepared)
    qs = [Question("fav", "q", "top_categories", top=1), Question("tod", "q", "time_of_day")]
    pairs = build_pairs(table, meta, texts, qs)
    cats = meta["spec"]["categories"]
    checked = 0
    for p in range(len(pairs)):
        row = int(pairs.row[p])
        if pairs.question[p] == 0:
            c = [x for x in table["h_category"][row].as_py() if x >= 0]
            counts = np.bincount(c, minlength=len(cats))
            assert pairs.answer[p] == f"Mostly {cats[int(np.argmax(counts))]}."
        else:
            hours = np.asarray(table["h_time"][row].as_py()) % 86400 // 21600
            assert pairs.answer[p] == f"Mostly {DAY_PARTS[int(np.argmax(np.bincount(hours, minlength=4)))]}."
        checked += 1
        if checked > 40:
            break
    assert checked > 40


def test_a_question_the_data_cannot_answer_is_skipped_with_the_reason(prepared):
    table, meta, texts = _parts(prepared)
    no_cats = _with_column(table, "h_category", [[-1] * len(x) for x in table["h_category"].to_pylist()])
    pairs = build_pairs(no_cats, meta, texts, [Question("fav", "q", "top_categories"),
                                               Question("act", "q", "activity")])
    assert pairs.counts() == {"fav": 0, "act": int((table["split"].to_numpy() == Split.TRAIN).sum())}
    assert "no event categories" in pairs.skipped["fav"]


def test_question_config_errors_name_the_entry(prepared):
    with pytest.raises(DataError, match="unknown answer kind 'shoe_size'"):
        questions_from_config([{"name": "x", "query": "q", "answer": "shoe_size"}])
    with pytest.raises(DataError, match=r"questions\[1\]: missing key\(s\) \['query'\]"):
        questions_from_config([{"name": "a", "query": "q", "answer": "activity"}, {"name": "b", "answer": "activity"}])
    with pytest.raises(DataError, match="used more than once"):
        questions_from_config([{"name": "a", "query": "q", "answer": "activity"}] * 2)
    table, meta, texts = _parts(prepared)
    with pytest.raises(DataError, match="unknown source 'shop'"):
        build_pairs(table, meta, texts, [Question("s", "q", "value_level", source="shop")])
    spend = build_pairs(table, meta, texts, [Question("s", "How much does this user spend?", "value_level",
                                                     source="payment")])
    assert len(spend) > 0 and all(a.split(":")[0] in ("Low", "Medium", "High") for a in spend.answer)
