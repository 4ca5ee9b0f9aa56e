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
