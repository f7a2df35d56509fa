"""Evaluation metrics (shared and separate heads, ensembles) and the task tools (fixed head, training)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mudsc_experiments.evaluate import EvaluationError, TaskMetrics, accuracy, ensemble_logits, predict_logits, task_metrics
from mudsc_experiments.tasks import ClassEmbeddingHead, HeadedModel, class_embeddings, split_classes, train_classifier, with_class_head

TASKS = [[0, 1], [2, 3]]


pytestmark = pytest.mark.usefixtures("one_thread")


def _onehot_logits(rows: list[list[float]]) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float32)


# --------------------------------------------------------------------------- accuracy


def test_accuracy_plain_and_restricted():
    logits = _onehot_logits([[0, 5, 1, 9], [3, 0, 1, 2], [0, 0, 4, 1]])
    y = torch.tensor([1, 0, 2])
    assert accuracy(logits, y) == pytest.approx(2 / 3)  # row 0 predicts 3
    assert accuracy(logits, y, classes=[0, 1]) == pytest.approx(2 / 3)  # row 0 -> 1 (right), row 2 -> 0 or 1 (wrong)
    assert accuracy(logits, y, classes=[0, 1, 2]) == pytest.approx(1.0)
    assert math.isnan(accuracy(logits[:0], y[:0]))


# --------------------------------------------------------------------------- shared head


def test_task_metrics_shared_head_by_hand():
    # 6 samples, classes 0..3, tasks {0,1} and {2,3}; column 4 is a class in no task
    logits = _onehot_logits([
        [5, 1, 0, 0, 9],  # y=0: union argmax 0 (right; col 4 ignored); task argmax 0 (right)
        [2, 1, 3, 0, 0],  # y=1: union argmax 2 (wrong); task {0,1} argmax 0 (wrong)
        [0, 4, 1, 0, 0],  # y=1: union 1 (right); task 1 (right)
        [0, 0, 2, 1, 0],  # y=2: union 2 (right); task 2 (right)
        [6, 0, 1, 2, 0],  # y=3: union 0 (wrong); task {2,3} argmax 3 (right)
        [0, 0, 5, 1, 0],  # y=3: union 2 (wrong); task 2 (wrong)
    ])
    y = torch.tensor([0, 1, 1, 2, 3, 3])
    m = task_metrics(logits, None, y, TASKS)
    assert isinstance(m, TaskMetrics)
    assert m.joint == pytest.approx(3 / 6)
    assert m.per_task == pytest.approx([2 / 3, 2 / 3])
    assert m.mean_per_task == pytest.approx(2 / 3)
    assert m.to_dict() == {"joint": m.joint, "per_task": m.per_task, "mean_per_task": m.mean_per_task}


def test_task_metrics_ignores_samples_outside_the_tasks_and_runs_models():
    logits = _onehot_logits([[3, 0, 0, 0, 0], [0, 0, 0, 0, 1]])
    y = torch.tensor([0, 4])  # class 4 is in no task: left out
    assert task_metrics(logits, None, y, TASKS).joint == 1.0
    model = nn.Linear(5, 5, bias=False)
    with torch.no_grad():
        model.weight.copy_(torch.eye(5))
    assert task_metrics(model, logits, y, TASKS).joint == 1.0


def test_task_metrics_rejects_bad_tasks_and_outputs():
    logits = torch.zeros(2, 4)
    y = torch.tensor([0, 2])
    with pytest.raises(ValueError, match="disjoint"):
        task_metrics(logits, None, y, [[0, 1], [1, 2]])
    with pytest.raises(ValueError, match="separate"):
        task_metrics((logits, logits), None, y, TASKS)
    with pytest.raises(ValueError, match="one output per task"):
        task_metrics(logits, None, y, TASKS, heads="separate")


# --------------------------------------------------------------------------- separate heads


def _separate_case():
    # head 0 knows classes {0,1}, head 1 knows {2,3}; positional columns
    h0 = _onehot_logits([[2, 0], [0, 1], [3, 0], [0, 0.1]])
    h1 = _onehot_logits([[0, 0], [5, 0], [0, 1], [0, 4]])
    y = torch.tensor([0, 1, 3, 3])
    # concatenated softmax, by hand:
    # s0: h0 softmax [.881, .119], h1 [.5, .5]      -> class 0 (right)
    # s1: h0 [.269, .731], h1 [.993, .007]           -> class 2 (wrong)
    # s2: h0 [.953, .047], h1 [.269, .731]           -> class 0 (wrong)
    # s3: h0 [.475, .525], h1 [.018, .982]           -> class 3 (right)
    return h0, h1, y


def test_task_metrics_separate_heads_positional():
    h0, h1, y = _separate_case()
    m = task_metrics((h0, h1), None, y, TASKS, heads="separate")
    assert m.joint == pytest.approx(2 / 4)
    # task 0 samples (0, 1): head 0 argmax 0, 1 -> both right; task 1 samples (2, 3): head 1 -> 3, 3 -> both right
    assert m.per_task == pytest.approx([1.0, 1.0])
    assert m.mean_per_task == pytest.approx(1.0)


def test_task_metrics_separate_heads_indexed_by_class_id_and_explicit():
    h0, h1, y = _separate_case()
    full0 = torch.full((4, 4), -7.0)
    full0[:, [0, 1]] = h0  # columns 2, 3 of head 0 are junk that must be ignored
    full1 = torch.full((4, 4), 9.0)
    full1[:, [2, 3]] = h1
    want = task_metrics((h0, h1), None, y, TASKS, heads="separate")
    assert task_metrics((full0, full1), None, y, TASKS, heads="separate") == want  # inferred: 4 columns != 2 classes
    assert task_metrics((full0, full1), None, y, TASKS, heads="separate", head_classes="class_id") == want
    # explicit column order: head 1 stores class 3 first
    swapped = h1[:, [1, 0]]
    assert task_metrics((h0, swapped), None, y, TASKS, heads="separate", head_classes=[None, [3, 2]]) == want
    with pytest.raises(ValueError, match="positional"):
        task_metrics((full0, full1), None, y, TASKS, heads="separate", head_classes="position")


def test_predict_logits_tuple_outputs_and_batches():
    class Two(nn.Module):
        def forward(self, x):
            return x[:, :2] * 2, (x[:, 2:],)[0] + 1

    x = torch.randn(7, 4)
    a, b = predict_logits(Two(), x, batch_size=3)
    torch.testing.assert_close(a, x[:, :2] * 2)
    torch.testing.assert_close(b, x[:, 2:] + 1)
    lin = nn.Linear(4, 3).train()
    out = predict_logits(lin, x, batch_size=2)
    assert lin.training  # mode restored

    class Nested(nn.Module):  # a partial zip of Hugging Face models: each model's output flattened to a tuple
        def forward(self, x):
            return (x[:, :2], x[:, :1]), (x[:, 2:] - 1, x)

    a, b = predict_logits(Nested(), x, batch_size=4)
    torch.testing.assert_close(a, x[:, :2])
    torch.testing.assert_close(b, x[:, 2:] - 1)

    class Bad(nn.Module):
        def forward(self, x):
            return x, ("no logits",)

    with pytest.raises(EvaluationError, match="does not start with a logits tensor"):
        predict_logits(Bad(), x)
    torch.testing.assert_close(out, lin(x).detach())


# --------------------------------------------------------------------------- ensembles


def test_ensemble_logits_is_log_mean_softmax():
    torch.manual_seed(0)
    models = [nn.Linear(3, 4), nn.Linear(3, 4)]
    x = torch.randn(5, 3)
    with torch.no_grad():
        p = (F.softmax(models[0](x), 1) + F.softmax(models[1](x), 1)) / 2
    torch.testing.assert_close(ensemble_logits(models, x), p.log())
    # restricted: each model votes only on its own classes
    out = ensemble_logits(models, x, classes=TASKS)
    with torch.no_grad():
        q = torch.zeros(5, 4)
        q[:, :2] = F.softmax(models[0](x)[:, :2], 1) / 2
        q[:, 2:] = F.softmax(models[1](x)[:, 2:], 1) / 2
    torch.testing.assert_close(out.exp(), q)
    # per-task accuracy of the restricted ensemble is each model's own
    y = torch.tensor([0, 1, 2, 3, 1])
    m = task_metrics(out, None, y, TASKS)
    for i, t in enumerate(TASKS):
        assert m.per_task[i] == task_metrics(models[i](x).detach(), None, y, TASKS).per_task[i]


# --------------------------------------------------------------------------- the fixed class head


def test_class_embedding_head_is_a_fixed_unit_norm_buffer():
    head = ClassEmbeddingHead(dim=16, num_classes=10, seed=3, scale=7.0)
    assert list(head.parameters()) == []
    assert dict(head.named_buffers()).keys() == {"embeddings"}
    assert head.embeddings.shape == (10, 16)
    torch.testing.assert_close(head.embeddings.norm(dim=1), torch.ones(10))
    torch.testing.assert_close(head.embeddings, ClassEmbeddingHead(16, 10, seed=3).embeddings)
    assert not torch.equal(head.embeddings, class_embeddings(10, 16, seed=4))
    f = torch.randn(4, 16)
    want = 7.0 * F.normalize(f, dim=-1) @ head.embeddings.T
    torch.testing.assert_close(head(f), want)
    assert head(f).abs().max() <= 7.0 + 1e-5  # cosines times scale


def test_with_class_head_names_and_training_leaves_the_head_alone():
    model = with_class_head(nn.Sequential(nn.Linear(2, 8), nn.ReLU(), nn.Linear(8, 6)), dim=6, num_classes=4, seed=0)
    assert isinstance(model, HeadedModel)
    assert sorted(model.state_dict()) == ["backbone.0.bias", "backbone.0.weight", "backbone.2.bias", "backbone.2.weight", "head.embeddings"]
    before = model.head.embeddings.clone()
    x, y = _blobs(n=40)
    train_classifier(model, x, y, [0, 1, 2, 3], epochs=1, lr=1e-2, batch_size=16, seed=0)
    assert torch.equal(model.head.embeddings, before)


def test_split_classes():
    assert split_classes(10) == [[0, 1, 2, 3, 4], [5, 6, 7, 8, 9]]
    assert split_classes(7, 3) == [[0, 1], [2, 3, 4], [5, 6]]
    a = split_classes(10, 2, seed=1)
    assert a == split_classes(10, 2, seed=1)
    assert sorted(a[0] + a[1]) == list(range(10)) and len(a[0]) == 5 and a[0] == sorted(a[0])
    with pytest.raises(ValueError):
        split_classes(1, 2)


# --------------------------------------------------------------------------- training


def _blobs(n: int = 200, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Four well-separated Gaussian blobs in 2-D, labels 0..3."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.tensor([[3.0, 3.0], [-3.0, 3.0], [-3.0, -3.0], [3.0, -3.0]])
    y = torch.arange(n) % 4
    return centres[y] + 0.5 * torch.randn(n, 2, generator=g), y


def _tiny(seed: int) -> HeadedModel:
    torch.manual_seed(seed)
    return with_class_head(nn.Sequential(nn.Linear(2, 16), nn.ReLU(), nn.Linear(16, 8)), dim=8, num_classes=4)


@pytest.mark.parametrize("optimizer,lr", [("adam", 1e-2), ("sgd", 0.1)])
def test_train_classifier_learns_only_its_task(optimizer, lr):
    x, y = _blobs()
    model = train_classifier(_tiny(0), x, y, [1, 3], epochs=20, lr=lr, batch_size=32, seed=0, optimizer=optimizer)
    assert not model.training
    xt, yt = _blobs(seed=1)
    m = task_metrics(model, xt, yt, [[1, 3], [0, 2]])
    assert m.per_task[0] >= 0.95  # restricted to its classes, it separates them


def test_train_classifier_is_deterministic_and_reports_epochs():
    x, y = _blobs()
    events = []

    class Rec:
        def start(self, stage, total=None):
            events.append(("start", stage, total))

        def advance(self, n=1, **info):
            events.append(("advance", n, sorted(info)))

        def end(self):
            events.append(("end",))

    a = train_classifier(_tiny(0), x, y, [0, 2], epochs=3, lr=1e-2, batch_size=32, seed=5, reporter=Rec())
    b = train_classifier(_tiny(0), x, y, [0, 2], epochs=3, lr=1e-2, batch_size=32, seed=5)
    for k, v in a.state_dict().items():
        assert torch.equal(v, b.state_dict()[k]), k
    assert events == [("start", "training", 3)] + [("advance", 1, ["loss"])] * 3 + [("end",)]
    with pytest.raises(ValueError, match="no training samples"):
        train_classifier(_tiny(0), x, y, [7], epochs=1)


# --------------------------------------------------------------------------- bad arguments (adversarial run)


def test_evaluation_errors_are_one_line_mudsc_errors():
    """Defect 13: a batch size of 0 raised ValueError from range() (negative: 'needs one sample')."""
    from mudsc_graph.errors import MudscError
    from mudsc_experiments.evaluate import EvaluationError

    assert issubclass(EvaluationError, MudscError) and issubclass(EvaluationError, ValueError)  # old except ValueError still works
    lin = nn.Linear(4, 3)
    for bad in (0, -1, 2.5, True):
        with pytest.raises(EvaluationError, match="batch size"):
            predict_logits(lin, torch.randn(5, 4), batch_size=bad)
    with pytest.raises(EvaluationError, match="at least one sample"):
        predict_logits(lin, torch.randn(0, 4))


def test_classes_and_labels_the_logits_do_not_have_are_refused():
    """Defect 14: --tasks naming a class the model has no output for gave an IndexError."""
    from mudsc_experiments.evaluate import EvaluationError

    logits = torch.zeros(3, 5)
    y = torch.tensor([0, 1, 2])
    with pytest.raises(EvaluationError, match=r"class 7 .* 5 classes"):
        accuracy(logits, y, classes=[0, 7])
    with pytest.raises(EvaluationError, match=r"class 9 .* 5 classes"):
        task_metrics(logits, None, y, [[0, 1], [2, 9]])
    with pytest.raises(EvaluationError, match=r"label 9 \(sample 1\) .* 5 classes"):
        accuracy(logits, torch.tensor([0, 9, 1]))
    with pytest.raises(EvaluationError, match="3 rows .* 4 labels"):
        accuracy(logits, torch.tensor([0, 1, 2, 3]))  # used to broadcast silently when one side had 1 row
    with pytest.raises(EvaluationError, match="one row of class scores"):
        accuracy(torch.zeros(3), y)


def test_nan_logits_are_refused_not_counted():
    """Defect 7 (library part): NaN outputs gave an accuracy (argmax of NaN) instead of an error."""
    from mudsc_experiments.evaluate import EvaluationError

    logits = torch.zeros(3, 4)
    logits[1, 2] = float("nan")
    y = torch.tensor([0, 1, 2])
    with pytest.raises(EvaluationError, match=r"NaN .*sample 1"):
        accuracy(logits, y)
    with pytest.raises(EvaluationError, match=r"NaN .*sample 1"):
        task_metrics(logits, None, y, TASKS)
    with pytest.raises(EvaluationError, match=r"NaN .*sample 1"):
        task_metrics((logits[:, :2], logits[:, 2:]), None, y, TASKS, heads="separate")
    ok = torch.zeros(3, 4)
    ok[:, 3] = float("-inf")  # -inf is what ensemble_logits gives a class no model votes on: allowed
    assert accuracy(ok, y) == pytest.approx(1 / 3)
