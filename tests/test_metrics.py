"""lowrank_train/metrics.py: the multi-label F1s against a case computed by hand (and scikit-learn's
definitions where it is installed), the loss and metric chosen by the labels' shape."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lowrank_train.metrics import classification_loss, multilabel_f1, probabilities, score, scores

# 4 samples × 3 classes
TRUTH = torch.tensor([[1, 0, 1], [0, 1, 0], [1, 1, 0], [0, 0, 0]], dtype=torch.float32)
PREDICTED = torch.tensor([[1, 0, 0], [0, 1, 1], [1, 0, 0], [0, 0, 0]], dtype=torch.bool)


def test_multilabel_f1_by_hand():
    # per class: TP, FP, FN = c0 (2, 0, 0) → F1 1; c1 (1, 0, 1) → 2/3; c2 (0, 1, 1) → 0
    # micro: ΣTP 3, ΣFP 1, ΣFN 2 → 6 / 9; weighted by positives (2, 2, 1): (2 + 4/3 + 0) / 5
    # samples: 2/3, 2/3, 2/3 and 0 (no true, no predicted label) → 0.5
    f1 = multilabel_f1(PREDICTED, TRUTH)
    assert f1["f1_macro"] == pytest.approx((1 + 2 / 3 + 0) / 3)
    assert f1["f1_micro"] == pytest.approx(6 / 9)
    assert f1["f1_weighted"] == pytest.approx((2 + 4 / 3) / 5)
    assert f1["f1_samples"] == pytest.approx(0.5)


def test_multilabel_f1_matches_scikit_learn():
    metrics = pytest.importorskip("sklearn.metrics", reason="scikit-learn is an optional reference")
    generator = torch.Generator().manual_seed(0)
    truth = torch.rand(64, 7, generator=generator) < 0.3
    predicted = torch.rand(64, 7, generator=generator) < 0.3
    ours = multilabel_f1(predicted, truth.float())
    for average in ("micro", "macro", "weighted", "samples"):
        expected = metrics.f1_score(truth.numpy(), predicted.numpy(), average=average, zero_division=0)
        assert ours[f"f1_{average}"] == pytest.approx(expected)


def test_the_labels_shape_picks_loss_probabilities_and_metric():
    logits = torch.tensor([[2.0, -1.0, 0.5], [-0.3, 0.2, 1.0]])
    classes = torch.tensor([0, 1])
    assert torch.equal(classification_loss(logits, classes), F.cross_entropy(logits, classes))
    assert scores(logits, classes) == {"accuracy": 0.5}
    multi_hot = torch.tensor([[1.0, 0.0, 1.0], [0.0, 0.0, 1.0]])
    assert torch.equal(classification_loss(logits, multi_hot), F.binary_cross_entropy_with_logits(logits, multi_hot))
    assert set(scores(logits, multi_hot)) == {"f1_micro", "f1_macro", "f1_weighted", "f1_samples"}
    # a logit ≥ 0 is a predicted class, as a probability ≥ 0.5 is
    assert score(logits, multi_hot) == score(probabilities(logits, True), multi_hot, already_probabilities=True)
    assert torch.allclose(probabilities(logits, False).sum(1), torch.ones(2))
