"""How good a model's predictions are: balanced accuracy, per-class scores, confusion matrix,
the most-confused pairs, the highest-loss mistakes and calibration.

The data are imbalanced (dev: 1,000 cars, 250 trucks, 500 cats), so plain accuracy rewards
predicting "car"; balanced accuracy, the mean of the per-class accuracies, is the number to
compare. Every script scores with the functions here: tester.py's report, trainer.py's
per-epoch scores and adversarialExample.py's accuracy under attack.
"""
import numpy as np

from dataset import CLASSES

LABELS = list(range(len(CLASSES)))
CALIBRATION_BINS = 15


def ece_definition(bins=CALIBRATION_BINS):
    """What calibration's "ece" is, in words, for its number of bins."""
    return (f"top-label ECE: the mean over {bins} equal-width confidence bins (closed on the right), weighted "
            "by their share of the images, of |accuracy - mean confidence|, where confidence is the "
            "probability of the predicted class (Guo et al. 2017)")


ECE_DEFINITION = ece_definition()
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


def most_confused(confusion_matrix):
    """The off-diagonal cells of a confusion matrix (rows true, columns predicted) that hold errors,
    most errors first (ties in class order), as fastai's most_confused: a list of {"true",
    "predicted", "count", "share"}, share being the cell's part of all errors."""
    cm = np.asarray(confusion_matrix, dtype=np.int64)
    errors = int(cm.sum() - np.trace(cm))
    cells = [(int(cm[t, p]), t, p) for t in LABELS for p in LABELS if t != p and cm[t, p] > 0]
    cells.sort(key=lambda cell: -cell[0])  # stable: equal counts keep class order
    return [{"true": CLASSES[t], "predicted": CLASSES[p], "count": n, "share": n / errors} for n, t, p in cells]


def _as_probabilities(probabilities, n):
    if hasattr(probabilities, "detach"):
        probabilities = probabilities.detach().cpu().numpy()
    probabilities = np.asarray(probabilities, dtype=np.float64)
    if probabilities.shape != (n, len(CLASSES)):
        raise ValueError(f"expected probabilities of shape ({n}, {len(CLASSES)}), got {probabilities.shape}")
    if not np.isfinite(probabilities).all() or probabilities.min() < 0 or probabilities.max() > 1 + 1e-6:
        raise ValueError("probabilities must be finite and in [0, 1]")
    return probabilities.clip(0, 1)  # float32 rounding may leave a softmax a hair above 1


def top_losses(y_true, y_pred, probabilities, k):
    """The k misclassified images with the highest cross-entropy loss (-log of the probability
    given to the true class), highest first, ties by index: a list of {"index", "true",
    "predicted", "probability" (of the predicted class), "true_probability", "loss"}. Fewer
    than k when there are fewer errors; none for a perfect model."""
    y_true, y_pred = _as_labels(y_true), _as_labels(y_pred)
    probabilities = _as_probabilities(probabilities, len(y_true))
    if len(y_pred) != len(y_true):
        raise ValueError(f"{len(y_true)} true labels but {len(y_pred)} predictions")
    rows = np.arange(len(y_true))
    true_probability = probabilities[rows, y_true]
    # A float32 softmax rounds a probability below 1.4e-45 to 0: count it as that, so the loss
    # stays finite (at most 103.3) and the JSON valid.
    loss = -np.log(np.maximum(true_probability, float(np.nextafter(np.float32(0), np.float32(1)))))
    errors = np.flatnonzero(y_pred != y_true)
    order = errors[np.lexsort((errors, -loss[errors]))][:k]
    return [{"index": int(i), "true": CLASSES[y_true[i]], "predicted": CLASSES[y_pred[i]],
             "probability": float(probabilities[i, y_pred[i]]), "true_probability": float(true_probability[i]),
             "loss": float(loss[i])} for i in order]


def calibration(y_true, y_pred, probabilities, bins=CALIBRATION_BINS):
    """How far the model's confidence is from its accuracy: top-label expected calibration error.

    Confidence is the probability of the predicted class y_pred, correct is y_pred == y_true;
    the images are put in `bins` equal-width confidence bins, intervals closed on the right as
    in scikit-learn's calibration_curve (which gives the same curve: a test checks it), and
    ECE = sum over bins of (images in bin / n) x |accuracy - mean confidence| (ece_definition).
    Returns {"ece", "mean_confidence", "accuracy", "bins", "definition", "curve": {"confidence",
    "accuracy", "count"} of the non-empty bins}.
    """
    y_true, y_pred = _as_labels(y_true), _as_labels(y_pred)
    probabilities = _as_probabilities(probabilities, len(y_true))
    if len(y_pred) != len(y_true) or len(y_true) == 0:
        raise ValueError(f"{len(y_true)} true labels and {len(y_pred)} predictions: nothing to calibrate")
    confidence = probabilities[np.arange(len(y_pred)), y_pred]
    correct = (y_pred == y_true).astype(np.float64)
    which = np.searchsorted(np.linspace(0, 1, bins + 1)[1:-1], confidence)  # one bin per image
    counts = np.bincount(which, minlength=bins)
    filled = counts > 0
    accuracy = np.bincount(which, weights=correct, minlength=bins)[filled] / counts[filled]
    mean_confidence = np.bincount(which, weights=confidence, minlength=bins)[filled] / counts[filled]
    counts = counts[filled]
    return {
        "ece": float(np.sum(counts / len(y_true) * np.abs(accuracy - mean_confidence))),
        "mean_confidence": float(confidence.mean()),
        "accuracy": float(correct.mean()),
        "bins": bins,
        "definition": ece_definition(bins),
        "curve": {"confidence": mean_confidence.tolist(), "accuracy": accuracy.tolist(), "count": counts.tolist()},
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
    if "calibration" in metrics:
        c = metrics["calibration"]
        lines.append(f"calibration error  {c['ece']:7.2%}   (top-label ECE, {c['bins']} equal-width bins; mean "
                     f"confidence {c['mean_confidence']:.2%})")
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
    if "most_confused" in metrics:
        pairs = metrics["most_confused"]
        errors = sum(pair["count"] for pair in pairs)
        lines.append("")
        lines.append(f"most confused (true -> predicted), of {errors} error{'s' * (errors != 1)}" if pairs else
                     "most confused: none, every image is predicted right")
        for pair in pairs:
            arrow = f"{pair['true']} -> {pair['predicted']}"
            lines.append(f"{arrow:<{2 * width + 4}}{pair['count']:>{cell}}{pair['share']:>9.1%}")
    return "\n".join(lines)
