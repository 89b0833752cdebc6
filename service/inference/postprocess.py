"""What Predict makes of a batch's outputs: softmax probabilities and class rankings
(computed once per batch in the compute thread, `run_ranked`), then per image the
top-k classes, and the logits and embedding where asked (`predictions`). Pure numpy
and protobuf: no model, no event loop."""

from __future__ import annotations

import numpy as np

from tlserve.client.tlserve.v1 import tlserve_pb2 as pb


def softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise softmax in float64, stable for any logit range: (N, C) → (N, C)."""
    z = logits.astype(np.float64)
    z -= z.max(axis=1, keepdims=True)
    np.exp(z, out=z)
    z /= z.sum(axis=1, keepdims=True)
    return z


def top_k(probabilities: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k highest per row, highest first, ties by lower index: (N, k)."""
    n, c = probabilities.shape
    k = min(k, c)
    if c <= 256 or k >= c // 4:
        return np.argsort(-probabilities, axis=1, kind="stable")[:, :k]
    # Many classes: sort only the candidates, those at least the k-th highest value
    # (ties at the boundary included, then cut in index order).
    kth = -np.partition(-probabilities, k - 1, axis=1)[:, k - 1]  # (N,)
    out = np.empty((n, k), dtype=np.int64)
    for i in range(n):
        candidates = np.flatnonzero(probabilities[i] >= kth[i])  # ascending indices
        out[i] = candidates[np.argsort(-probabilities[i, candidates], kind="stable")[:k]]
    return out


# Extra outputs the batch thread adds for Predict (KServe's `infer` returns only the model's).
PROBABILITIES = "_probabilities"
RANKING = "_ranking"


def run_ranked(run, x: np.ndarray) -> dict[str, np.ndarray]:
    """`run(x)` plus, once per batch in the compute thread rather than per request on the
    event loop: softmax probabilities and every row's class indices, highest first."""
    outputs = dict(run(x))
    probabilities = softmax(outputs["logits"])  # (N, C)
    outputs[PROBABILITIES] = probabilities
    outputs[RANKING] = top_k(probabilities, probabilities.shape[1])  # (N, C)
    return outputs


def predictions(
    outputs: dict[str, np.ndarray], class_names: tuple[str, ...], k: int, *, logits: bool, embeddings: bool,
) -> list[pb.Prediction]:
    raw = outputs["logits"]  # (N, C)
    embedding = outputs.get("embedding") if embeddings else None
    predictions = []
    for i, (ranking, probabilities) in enumerate(zip(outputs[RANKING].tolist(), outputs[PROBABILITIES].tolist())):
        prediction = pb.Prediction(top_k=[
            pb.ClassScore(label=class_names[j], index=j, probability=probabilities[j]) for j in ranking[:k]
        ])
        if logits:
            prediction.logits.extend(raw[i].tolist())
        if embedding is not None:
            prediction.embedding.extend(embedding[i].tolist())
        predictions.append(prediction)
    return predictions
