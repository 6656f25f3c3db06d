"""The task's loss, probabilities and metrics, chosen by the labels' shape: single-label (N,) int64 class
indices, or multi-label (N, C) float multi-hot (MM-IMDb's genres).

    single-label   loss  cross-entropy;                    probabilities softmax(z);   metric accuracy
    multi-label    loss  mean binary cross-entropy;        probabilities sigmoid(z);   metric F1 macro
                   a class is predicted when its probability is ≥ 0.5 (logit ≥ 0)

F1 (multi-label), with TP_c, FP_c, FN_c counted over the samples for each class c:
    micro     2 ΣTP / (2 ΣTP + ΣFP + ΣFN)
    macro     mean over classes of 2 TP_c / (2 TP_c + FP_c + FN_c)   (a class with no positives and no
              predictions scores 0, as scikit-learn's zero_division=0)
    weighted  the per-class F1 averaged with weights = positives of each class
    samples   mean over samples of their own F1 (0 for a sample with no true and no predicted label)
MM-IMDb papers report F1 micro and macro (U2A and the missing-aware prompts: macro); macro is the one
validation selects on.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

PRIMARY = {False: "accuracy", True: "f1_macro"}  # multilabel → the metric validation selects on


def is_multilabel(labels: torch.Tensor) -> bool:
    """True for (N, C) multi-hot labels, False for (N,) class indices."""
    return labels.ndim == 2


def classification_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """logits (B, C), labels (B,) or (B, C) → the task's mean loss (float32 on the logits)."""
    if is_multilabel(labels):
        return F.binary_cross_entropy_with_logits(logits.float(), labels.float())
    return F.cross_entropy(logits, labels)


def probabilities(logits: torch.Tensor, multilabel: bool) -> torch.Tensor:
    return logits.float().sigmoid() if multilabel else logits.float().softmax(1)


def multilabel_f1(predicted: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """F1 micro, macro, weighted and samples of bool predictions (N, C) against multi-hot labels (N, C)."""
    truth = labels.bool()
    tp = (predicted & truth).sum(0).double()
    fp = (predicted & ~truth).sum(0).double()
    fn = (~predicted & truth).sum(0).double()
    per_class = torch.where(2 * tp + fp + fn > 0, 2 * tp / (2 * tp + fp + fn).clamp(min=1), torch.zeros_like(tp))
    positives = truth.sum(0).double()
    sample_tp = (predicted & truth).sum(1).double()
    sample_total = predicted.sum(1).double() + truth.sum(1).double()
    per_sample = torch.where(sample_total > 0, 2 * sample_tp / sample_total.clamp(min=1), torch.zeros_like(sample_tp))
    micro_total = 2 * tp.sum() + fp.sum() + fn.sum()
    return dict(
        f1_micro=(2 * tp.sum() / micro_total).item() if micro_total > 0 else 0.0,
        f1_macro=per_class.mean().item(),
        f1_weighted=((per_class * positives).sum() / positives.sum()).item() if positives.sum() > 0 else 0.0,
        f1_samples=per_sample.mean().item(),
    )


def scores(outputs: torch.Tensor, labels: torch.Tensor, already_probabilities: bool = False) -> dict[str, float]:
    """Every metric of the task on ``outputs`` (N, C): logits, or probabilities when ``already_probabilities``
    (a fallback's averaged probabilities); single-label: {"accuracy"}, multi-label: the four F1s."""
    if not is_multilabel(labels):
        return dict(accuracy=(outputs.argmax(1) == labels).float().mean().item())
    predicted = outputs >= (0.5 if already_probabilities else 0.0)
    return multilabel_f1(predicted, labels)


def score(outputs: torch.Tensor, labels: torch.Tensor, already_probabilities: bool = False) -> float:
    """The task's primary metric (PRIMARY): accuracy, or F1 macro for multi-label."""
    return scores(outputs, labels, already_probabilities)[PRIMARY[is_multilabel(labels)]]
