"""How good a model's predictions are: balanced accuracy, per-class scores, confusion matrix.

The data are imbalanced (dev: 1,000 cars, 250 trucks, 500 cats), so plain accuracy rewards
predicting "car"; balanced accuracy, the mean of the per-class accuracies, is the number to
compare. Every script scores with the functions here: tester.py's report, trainer.py's
per-epoch scores and adversarialExample.py's accuracy under attack.
"""
import numpy as np

from dataset import CLASSES

LABELS = list(range(len(CLASSES)))
TTA_NAMES = {"none": "none (the plain model)", "flip": "flip (averaged with the mirrored image; opt-in)"}


def _as_labels(y):
    if hasattr(y, "detach"):  # a torch tensor, possibly on the GPU
        y = y.detach().cpu().numpy()
    y = np.asarray(y).ravel()
    if y.size and (not np.issubdtype(y.dtype, np.integer) or y.min() < 0 or y.max() >= len(CLASSES)):
        raise ValueError(f"labels must be integers in 0..{len(CLASSES) - 1}, got {np.unique(y)[:10]}")
    return y.astype(np.int64)


def balanced_accuracy(y_true, correct):
    """Mean over the classes present in y_true of the share of their images marked correct.

    With correct = (y_pred == y_true) this is scikit-learn's balanced_accuracy_score, computed
    the same way (float64, class by class); taking a correctness mask lets accuracy under
    attack, where an image counts as robust only if every attack failed, use it too.
    """
    y_true = _as_labels(y_true)
    correct = np.asarray(correct.detach().cpu() if hasattr(correct, "detach") else correct, dtype=bool).ravel()
    if len(y_true) != len(correct):
        raise ValueError(f"{len(y_true)} labels but {len(correct)} correctness marks")
    shares = [correct[y_true == c].sum() / (y_true == c).sum() for c in LABELS if (y_true == c).any()]
    if not shares:
        raise ValueError("no labels to evaluate")
    return float(np.mean(shares))


def compute_metrics(y_true, y_pred):
    """Metrics of predicted against true labels (ints 0..2 as lists, arrays or tensors), as plain JSON types.

    Returns {"n", "accuracy", "balanced_accuracy", "per_class": {name: {"accuracy",
    "precision", "recall", "support"}}, "confusion_matrix" (rows true, columns
    predicted), "predicted_counts": {name: count}}. A class's accuracy is its recall.
    """
    # Imported here: sklearn.metrics takes over a second to import, which every run that
    # stops at a bad flag or path (and every trainer.py start) would otherwise pay.
    from sklearn.metrics import accuracy_score, confusion_matrix, precision_recall_fscore_support

    y_true, y_pred = _as_labels(y_true), _as_labels(y_pred)
    if len(y_true) != len(y_pred):
        raise ValueError(f"{len(y_true)} true labels but {len(y_pred)} predictions")
    if len(y_true) == 0:
        raise ValueError("no labels to evaluate")
    precision, recall, _, support = precision_recall_fscore_support(y_true, y_pred, labels=LABELS, zero_division=0)
    cm = confusion_matrix(y_true, y_pred, labels=LABELS)
    per_class = {
        name: {
            "accuracy": float(recall[c]),
            "precision": float(precision[c]),
            "recall": float(recall[c]),
            "support": int(support[c]),
        }
        for c, name in enumerate(CLASSES)
    }
    return {
        "n": int(len(y_true)),
        "accuracy": float(accuracy_score(y_true, y_pred)),
        "balanced_accuracy": balanced_accuracy(y_true, y_pred == y_true),
        "per_class": per_class,
        "confusion_matrix": cm.astype(int).tolist(),
        "predicted_counts": {name: int(n) for name, n in zip(CLASSES, cm.sum(0))},
    }


def format_metrics(metrics):
    """The metrics dict from compute_metrics (optionally with checkpoint/data/tta) as a text table."""
    lines = []
    for key in ("checkpoint", "data", "tta"):
        if key in metrics:
            value = metrics[key]
            if key == "data":
                value = f"{value} ({metrics['n']} images)"
            if key == "tta":
                value = TTA_NAMES.get(value, value)
            lines.append(f"{key:<11} {value}")
    if lines:
        lines.append("")
    lines.append(f"accuracy           {metrics['accuracy']:7.2%}")
    lines.append(f"balanced accuracy  {metrics['balanced_accuracy']:7.2%}   (mean of the per-class accuracies)")
    lines.append("")
    width = max(len(name) for name in CLASSES) + 2
    lines.append(f"{'class':<{width}}{'support':>9}{'predicted':>11}{'accuracy':>10}{'precision':>11}{'recall':>9}")
    for name in CLASSES:
        m = metrics["per_class"][name]
        lines.append(
            f"{name:<{width}}{m['support']:>9}{metrics['predicted_counts'][name]:>11}"
            f"{m['accuracy']:>10.2%}{m['precision']:>11.2%}{m['recall']:>9.2%}"
        )
    lines.append("(a class's accuracy is its recall: the share of its images predicted as that class)")
    lines.append("")
    lines.append("confusion matrix, counts (rows: true class, columns: predicted class)")
    cell = max(7, max(len(str(v)) for row in metrics["confusion_matrix"] for v in row) + 2)
    lines.append(" " * width + "".join(f"{name:>{cell}}" for name in CLASSES))
    for name, row in zip(CLASSES, metrics["confusion_matrix"]):
        lines.append(f"{name:<{width}}" + "".join(f"{v:>{cell}}" for v in row))
    return "\n".join(lines)
