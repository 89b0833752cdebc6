"""Classification metrics of one split, as the API's `EvaluationReport`.

`report_from_predictions` is pure (tensors in, proto out) so it can be checked
against hand-computed cases; `engine.evaluate` runs a model over a loader and
calls it. (Prometheus metrics live in `service.metrics`, not here.)
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from tlserve.client.tlserve.v1 import tlserve_pb2 as pb


def confusion_matrix(labels: torch.Tensor, predictions: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(C, C) int64 counts, rows the true class, columns the predicted one."""
    flat = labels.long() * num_classes + predictions.long()  # (N,) row-major cell index
    return torch.bincount(flat, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def report_from_predictions(
    labels: torch.Tensor | Sequence[int],
    logits: torch.Tensor,
    class_names: Sequence[str],
    loss: float,
) -> pb.EvaluationReport:
    """Top-1 and top-k (k = min(5, C)) accuracy, `loss` as given (the mean
    cross-entropy, computed by the caller), per-class precision, recall, F1 and
    support, and the confusion matrix. A class never predicted has precision 0;
    one with no images has recall 0 (sklearn's `zero_division=0`)."""
    num_classes = len(class_names)
    labels = torch.as_tensor(labels, dtype=torch.long).reshape(-1)  # (N,)
    logits = torch.as_tensor(logits).float().reshape(len(labels), num_classes)  # (N, C)
    count = len(labels)
    if count == 0:
        return pb.EvaluationReport(
            loss=float(loss),
            per_class=[pb.ClassMetrics(label=name) for name in class_names],
            confusion_matrix=[0] * num_classes * num_classes,
        )
    predictions = logits.argmax(dim=1)  # (N,)
    k = min(5, num_classes)
    top_k = logits.topk(k, dim=1).indices  # (N, k)
    top5 = (top_k == labels[:, None]).any(dim=1).float().mean().item()

    matrix = confusion_matrix(labels, predictions, num_classes)  # (C, C)
    true_positives = matrix.diagonal().double()
    predicted = matrix.sum(dim=0).double()  # column sums
    support = matrix.sum(dim=1)  # row sums
    precision = torch.where(predicted > 0, true_positives / predicted.clamp(min=1), 0.0)
    recall = torch.where(support > 0, true_positives / support.clamp(min=1).double(), 0.0)
    denominator = precision + recall
    f1 = torch.where(denominator > 0, 2 * precision * recall / denominator.clamp(min=1e-300), 0.0)
    return pb.EvaluationReport(
        top1_accuracy=true_positives.sum().item() / count,
        top5_accuracy=top5,
        loss=float(loss),
        image_count=count,
        per_class=[
            pb.ClassMetrics(
                label=name,
                precision=precision[c].item(),
                recall=recall[c].item(),
                f1=f1[c].item(),
                support=int(support[c]),
            )
            for c, name in enumerate(class_names)
        ],
        confusion_matrix=matrix.reshape(-1).tolist(),
    )
