"""metrics.py: balanced accuracy, per-class scores and the confusion matrix on hand-checked cases."""
import json
import warnings

import numpy as np
import pytest
import torch
from sklearn.metrics import balanced_accuracy_score

import metrics

# Hand-made case. Rows true, columns predicted:
#   car   [3, 1, 0]   3 of 4 cars right
#   truck [1, 1, 0]   1 of 2 trucks right
#   cat   [1, 0, 1]   1 of 2 cats right
Y_TRUE = [0, 0, 0, 0, 1, 1, 2, 2]
Y_PRED = [0, 0, 0, 1, 1, 0, 2, 0]


def test_compute_metrics_hand_case():
    m = metrics.compute_metrics(Y_TRUE, Y_PRED)
    assert m["n"] == 8
    assert m["accuracy"] == pytest.approx(5 / 8)
    assert m["balanced_accuracy"] == pytest.approx((3 / 4 + 1 / 2 + 1 / 2) / 3)
    assert m["confusion_matrix"] == [[3, 1, 0], [1, 1, 0], [1, 0, 1]]
    assert m["predicted_counts"] == {"car": 5, "truck": 2, "cat": 1}
    expected = {  # precision: right / predicted as the class; recall: right / truly the class
        "car": {"precision": 3 / 5, "recall": 3 / 4, "support": 4},
        "truck": {"precision": 1 / 2, "recall": 1 / 2, "support": 2},
        "cat": {"precision": 1 / 1, "recall": 1 / 2, "support": 2},
    }
    for name, want in expected.items():
        got = m["per_class"][name]
        assert got["precision"] == pytest.approx(want["precision"])
        assert got["recall"] == pytest.approx(want["recall"])
        assert got["accuracy"] == pytest.approx(want["recall"])
        assert got["support"] == want["support"]


def test_compute_metrics_takes_tensors_and_returns_plain_json():
    # Nothing predicted "truck": its precision is 0 by convention, without a warning.
    y_true = torch.tensor([0, 1, 2, 2])
    y_pred = torch.tensor([0, 0, 2, 2])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        m = metrics.compute_metrics(y_true, y_pred)
    assert json.loads(json.dumps(m)) == m
    assert m["per_class"]["truck"] == {"accuracy": 0.0, "precision": 0.0, "recall": 0.0, "support": 1}
    assert m["balanced_accuracy"] == pytest.approx((1 + 0 + 1) / 3)
    assert type(m["confusion_matrix"][0][0]) is int and type(m["accuracy"]) is float


@pytest.mark.parametrize("y_true, y_pred", [([0, 1], [0]), ([0, 3], [0, 1]), ([], [])])
def test_compute_metrics_rejects_bad_labels(y_true, y_pred):
    with pytest.raises(ValueError):
        metrics.compute_metrics(y_true, y_pred)


def test_format_metrics_shows_table_and_matrix():
    text = metrics.format_metrics({"checkpoint": "a.ckpt", "data": "d.pickle", "tta": "none",
                                  **metrics.compute_metrics(Y_TRUE, Y_PRED)})
    assert "a.ckpt" in text and "d.pickle (8 images)" in text
    assert "62.50%" in text  # accuracy
    assert "58.33%" in text  # balanced accuracy
    car = next(line for line in text.splitlines() if line.startswith("car ") and "%" in line)
    assert car.split() == ["car", "4", "5", "75.00%", "60.00%", "75.00%"]
    matrix_rows = [line.split() for line in text.splitlines()[-3:]]
    assert matrix_rows == [["car", "3", "1", "0"], ["truck", "1", "1", "0"], ["cat", "1", "0", "1"]]


def test_balanced_accuracy_is_scikit_learns_bit_for_bit():
    rng = np.random.default_rng(0)
    for n in (7, 100, 1750):
        y_true, y_pred = rng.integers(0, 3, n), rng.integers(0, 3, n)
        assert metrics.balanced_accuracy(y_true, y_pred == y_true) == balanced_accuracy_score(y_true, y_pred)
    # A class missing from the true labels is left out of the mean, as scikit-learn does.
    y_true, y_pred = np.array([0, 0, 2, 2]), np.array([0, 1, 1, 2])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        expected = balanced_accuracy_score(y_true, y_pred)
    assert metrics.balanced_accuracy(y_true, y_pred == y_true) == expected == 0.5


def test_balanced_accuracy_of_a_correctness_mask():
    # Accuracy under attack: which images are still right, per class (the robust ones).
    labels = torch.tensor([0, 0, 0, 0, 1, 1, 2])
    robust = torch.tensor([True, True, False, False, True, False, True])
    assert metrics.balanced_accuracy(labels, robust) == pytest.approx((0.5 + 0.5 + 1.0) / 3)
    with pytest.raises(ValueError):
        metrics.balanced_accuracy(labels, robust[:3])


# ---------------------------------------------------------------------------
# The mistakes: most-confused pairs, highest-loss errors, calibration


def test_most_confused_are_the_off_diagonal_cells_most_first():
    cm = metrics.compute_metrics(Y_TRUE, Y_PRED)["confusion_matrix"]  # [[3, 1, 0], [1, 1, 0], [1, 0, 1]]
    pairs = metrics.most_confused(cm)
    # Three errors of one each: equal counts keep class order (true, then predicted).
    assert [(p["true"], p["predicted"], p["count"]) for p in pairs] == [
        ("car", "truck", 1), ("truck", "car", 1), ("cat", "car", 1)]
    assert [p["share"] for p in pairs] == pytest.approx([1 / 3] * 3)

    rng = np.random.default_rng(1)
    y_true, y_pred = rng.integers(0, 3, 500), rng.integers(0, 3, 500)
    cm = metrics.compute_metrics(y_true, y_pred)["confusion_matrix"]
    pairs = metrics.most_confused(cm)
    names = metrics.CLASSES
    cells = {(names[t], names[p]): cm[t][p] for t in range(3) for p in range(3) if t != p and cm[t][p]}
    assert {(p["true"], p["predicted"]): p["count"] for p in pairs} == cells
    assert [p["count"] for p in pairs] == sorted(cells.values(), reverse=True)
    assert sum(p["share"] for p in pairs) == pytest.approx(1)
    assert metrics.most_confused([[5, 0, 0], [0, 2, 0], [0, 0, 1]]) == []


def test_top_losses_are_the_highest_loss_errors_in_order():
    probs = np.array([[0.7, 0.2, 0.1],    # 0 car, right
                      [0.6, 0.3, 0.1],    # 1 truck -> car, loss -log 0.3
                      [0.9, 0.05, 0.05],  # 2 truck -> car, loss -log 0.05
                      [0.5, 0.1, 0.4],    # 3 cat -> car, loss -log 0.4
                      [0.1, 0.8, 0.1],    # 4 cat -> truck, loss -log 0.1
                      [0.6, 0.3, 0.1]])   # 5 truck -> car, the same loss as 1: by index
    y_true, y_pred = [0, 1, 1, 2, 2, 1], probs.argmax(1)
    top = metrics.top_losses(y_true, y_pred, probs, 10)
    assert [m["index"] for m in top] == [2, 4, 1, 5, 3]
    assert top[0] == {"index": 2, "true": "truck", "predicted": "car", "probability": 0.9, "true_probability": 0.05,
                      "loss": pytest.approx(-np.log(0.05))}
    assert [m["index"] for m in metrics.top_losses(y_true, y_pred, probs, 2)] == [2, 4]
    assert metrics.top_losses([0, 1], [0, 1], probs[[0, 4]], 5) == []  # a perfect model: no mistakes
    with pytest.raises(ValueError):
        metrics.top_losses(y_true, y_pred, probs[:3], 5)


def test_expected_calibration_error_hand_case():
    # Four images at confidence 0.9, three right: |0.75 - 0.9| = 0.15 in bin (0.867, 0.933].
    # Two at confidence 0.5, both right: |1 - 0.5| = 0.5 in bin (0.467, 0.533].
    # ECE = 4/6 x 0.15 + 2/6 x 0.5 = 0.2667 (top-label, 15 equal-width bins).
    probs = np.array([[0.9, 0.05, 0.05]] * 4 + [[0.5, 0.3, 0.2], [0.2, 0.5, 0.3]])
    y_true, y_pred = [0, 0, 0, 2, 0, 1], probs.argmax(1)
    c = metrics.calibration(y_true, y_pred, probs)
    assert c["ece"] == pytest.approx(4 / 6 * 0.15 + 2 / 6 * 0.5)
    assert c["bins"] == 15 and "top-label" in c["definition"]
    assert c["mean_confidence"] == pytest.approx((4 * 0.9 + 2 * 0.5) / 6)
    assert c["accuracy"] == pytest.approx(5 / 6)
    assert c["curve"] == {"confidence": pytest.approx([0.5, 0.9]), "accuracy": pytest.approx([1.0, 0.75]),
                          "count": [2, 4]}
    assert json.loads(json.dumps(c)) == c


def test_expected_calibration_error_against_a_plain_loop():
    rng = np.random.default_rng(2)
    logits = rng.normal(size=(1000, 3)) * 3
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    y_pred = probs.argmax(1)
    y_true = np.where(rng.random(1000) < 0.7, y_pred, rng.integers(0, 3, 1000))
    confidence, correct = probs.max(1), y_pred == y_true
    ece = 0.0
    for b in range(15):  # bins (b/15, (b+1)/15], the first closed at 0
        inside = (confidence > b / 15) & (confidence <= (b + 1) / 15) | ((b == 0) & (confidence == 0))
        if inside.any():
            ece += inside.mean() * abs(correct[inside].mean() - confidence[inside].mean())
    c = metrics.calibration(torch.tensor(y_true), torch.tensor(y_pred), torch.tensor(probs, dtype=torch.float32))
    assert c["ece"] == pytest.approx(ece, abs=1e-6)
    assert sum(c["curve"]["count"]) == 1000
    # A perfect, fully confident model is perfectly calibrated.
    assert metrics.calibration([0, 1, 2], [0, 1, 2], np.eye(3))["ece"] == 0
    # The reliability curve is scikit-learn's calibration_curve, bin for bin.
    from sklearn.calibration import calibration_curve

    accuracy, mean_confidence = calibration_curve(correct.astype(int), confidence, n_bins=15, strategy="uniform")
    assert c["curve"]["accuracy"] == pytest.approx(accuracy.tolist(), abs=1e-6)
    assert c["curve"]["confidence"] == pytest.approx(mean_confidence.tolist(), abs=1e-6)


def test_expected_calibration_error_bins_are_closed_on_the_right_at_their_edges():
    # Confidences exactly on the 15 bins' edges (0.4 = 6/15, 0.8 = 12/15: the same doubles np.linspace
    # gives), bins (b/15, (b+1)/15] as scikit-learn's calibration_curve has them:
    #   A 0.4 right  -> (5/15, 0.4]    |1 - 0.4|  = 0.60
    #   B 0.42 wrong -> (0.4, 7/15]    |0 - 0.42| = 0.42
    #   C 0.8 wrong, D 0.78 right -> (11/15, 0.8]: |0.5 - 0.79| = 0.29, two images
    #   E 1.0 right  -> (14/15, 1]     0
    # ECE = (0.60 + 0.42 + 2 x 0.29 + 0) / 5 = 0.32; bins closed on the left would give 0.24.
    probs = np.array([[0.4, 0.3, 0.3], [0.29, 0.42, 0.29], [0.8, 0.1, 0.1], [0.11, 0.11, 0.78], [1.0, 0.0, 0.0]])
    y_pred = probs.argmax(1)
    y_true = np.array([0, 0, 1, 2, 0])  # A, D and E right; B and C wrong
    assert (y_pred == [0, 1, 0, 2, 0]).all()
    c = metrics.calibration(y_true, y_pred, probs)
    assert c["ece"] == pytest.approx(0.32)
    assert c["curve"] == {"confidence": pytest.approx([0.4, 0.42, 0.79, 1.0]),
                          "accuracy": pytest.approx([1.0, 0.0, 0.5, 1.0]), "count": [1, 1, 2, 1]}
    from sklearn.calibration import calibration_curve

    accuracy, mean_confidence = calibration_curve((y_pred == y_true).astype(int), probs.max(1), n_bins=15)
    assert c["curve"]["accuracy"] == pytest.approx(accuracy.tolist())
    assert c["curve"]["confidence"] == pytest.approx(mean_confidence.tolist())
    # Four bins, edges 0.25, 0.5, 0.75: 0.5 and 0.5 right in (0.25, 0.5]; 0.75 and 0.6 wrong in (0.5, 0.75];
    # 1.0 right in (0.75, 1]. ECE = 2/5 x 0.5 + 2/5 x 0.675 = 0.47, and the definition names four bins.
    probs = np.array([[0.5, 0.25, 0.25], [0.25, 0.5, 0.25], [0.75, 0.125, 0.125], [0.6, 0.2, 0.2], [1.0, 0, 0]])
    c = metrics.calibration([0, 1, 1, 1, 0], probs.argmax(1), probs, bins=4)
    assert c["ece"] == pytest.approx(0.47) and c["curve"]["count"] == [2, 2, 1]
    assert c["bins"] == 4 and "4 equal-width" in c["definition"]


def test_format_metrics_shows_calibration_and_most_confused_pairs():
    m = metrics.compute_metrics(Y_TRUE, Y_PRED)
    probs = np.full((8, 3), 0.1)
    probs[np.arange(8), Y_PRED] = 0.8
    text = metrics.format_metrics({**m, "most_confused": metrics.most_confused(m["confusion_matrix"]),
                                   "calibration": metrics.calibration(Y_TRUE, Y_PRED, probs)})
    assert "calibration error   17.50%" in text  # |5/8 - 0.8| in the one bin
    lines = text.splitlines()
    assert lines[-4] == "most confused (true -> predicted), of 3 errors"
    assert [line.split() for line in lines[-3:]] == [["car", "->", "truck", "1", "33.3%"],
                                                     ["truck", "->", "car", "1", "33.3%"],
                                                     ["cat", "->", "car", "1", "33.3%"]]


def test_a_true_class_probability_of_zero_still_has_a_finite_loss():
    probs = np.array([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    top = metrics.top_losses([1, 1], [0, 1], probs, 5)
    assert [m["index"] for m in top] == [0] and np.isfinite(top[0]["loss"]) and top[0]["loss"] > 100
    json.loads(json.dumps(top), parse_constant=lambda c: pytest.fail(f"{c} in the JSON"))
