"""tester.py: metrics on a hand-checked case, the figure and JSON it writes, and one-line CLI errors."""
import json

import pytest
import torch
import torch.nn as nn

import dataset
import metrics
import models
import tester
from conftest import ROOT, needs_cifar, run_script

def test_plot_confusion_accepts_a_bare_matrix(tmp_path):
    path = tmp_path / "sub" / "cm.png"
    tester.plot_confusion([[3, 1, 0], [0, 0, 0], [1, 0, 1]], path, "empty truck row")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError):
        tester.plot_confusion([[1, 2], [3, 4]], tmp_path / "bad.png", "2x2")


def _expected_metrics(checkpoint, data, flip=False):
    images, labels = dataset.load_pickle(data)
    return metrics.compute_metrics(labels, models.predict(models.load_model(checkpoint), images, flip=flip))


def test_default_run_writes_figure_and_json(small_data, tmp_path):
    # No arguments: checkpoints/pre_trained.ckpt on data/dev.pickle, outputs in figures/.
    (tmp_path / "data").symlink_to(small_data, target_is_directory=True)
    torch.manual_seed(0)
    models.SimpleModel().save(tmp_path / "checkpoints" / "pre_trained.ckpt")

    result = run_script("tester.py", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "balanced accuracy" in result.stdout and "confusion matrix" in result.stdout

    figure = tmp_path / "figures" / "confusion_pre_trained.png"
    assert figure.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    record = json.loads((tmp_path / "figures" / "metrics_pre_trained.json").read_text())
    assert list(record) == ["checkpoint", "data", "n", "tta", "accuracy", "balanced_accuracy",
                            "per_class", "confusion_matrix", "predicted_counts"]
    assert record["checkpoint"] == "checkpoints/pre_trained.ckpt"
    assert record["data"] == "data/dev.pickle"
    assert record["tta"] == "none"
    assert record["n"] == 210
    assert {k: v["support"] for k, v in record["per_class"].items()} == {"car": 100, "truck": 50, "cat": 60}
    assert sum(map(sum, record["confusion_matrix"])) == 210
    expected = _expected_metrics(tmp_path / "checkpoints" / "pre_trained.ckpt", small_data / "dev.pickle", flip=False)
    assert {k: record[k] for k in expected} == expected


def test_course_and_bare_checkpoints_agree(small_data, tmp_path):
    torch.manual_seed(1)
    model = models.SimpleModel()
    course, bare = tmp_path / "course.ckpt", tmp_path / "bare.pt"
    model.save(course)
    assert set(torch.load(course)) == {"model_state_dict"}
    torch.save(model.state_dict(), bare)

    records = {}
    for ckpt in (course, bare):
        result = run_script("tester.py", "--checkpoint", ckpt, "--data", small_data / "dev.pickle",
                            "--out", tmp_path / "out", "--batch-size", 64, "--device", "cpu", cwd=tmp_path)
        assert result.returncode == 0, result.stderr
        assert (tmp_path / "out" / f"confusion_{ckpt.stem}.png").is_file()
        records[ckpt.stem] = json.loads((tmp_path / "out" / f"metrics_{ckpt.stem}.json").read_text())
    assert records["bare"].pop("checkpoint") == str(bare)
    assert records["course"].pop("checkpoint") == str(course)
    assert records["bare"] == records["course"]


def test_flip_tta_in_process(small_data, tmp_path, capsys):
    torch.manual_seed(2)
    ckpt = tmp_path / "m.ckpt"
    models.SimpleModel().save(ckpt)
    data = small_data / "dev.pickle"
    tester.main(["--checkpoint", str(ckpt), "--data", str(data), "--out", str(tmp_path), "--tta", "flip"])
    assert "flip" in capsys.readouterr().out
    record = json.loads((tmp_path / "metrics_m.json").read_text())
    assert record["tta"] == "flip"
    expected = _expected_metrics(ckpt, data, flip=True)
    assert {k: record[k] for k in expected} == expected


# ---------------------------------------------------------------------------
# Bad input: one "tester.py: error: ..." line naming the file, non-zero exit, no traceback.


@pytest.fixture
def good_checkpoint(tmp_path):
    path = tmp_path / "good.ckpt"
    models.SimpleModel().save(path)
    return path


@pytest.fixture
def tiny_data(tmp_path):
    """A valid 6-image course pickle, so the error tests need no CIFAR-10 copy."""
    path = tmp_path / "tiny.pickle"
    dataset.save_pickle(path, torch.rand(6, 3, 32, 32) * 2 - 1, torch.tensor([0, 1, 2, 0, 1, 2]))
    return path


def _assert_one_line_error(result, mentions):
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("tester.py: error:")
    assert str(mentions) in lines[0]


def test_error_missing_checkpoint(tmp_path, tiny_data):
    missing = tmp_path / "nope.ckpt"
    result = run_script("tester.py", "--checkpoint", missing, "--data", tiny_data, "--out", tmp_path, cwd=tmp_path)
    _assert_one_line_error(result, missing)


def test_error_checkpoint_of_another_architecture(tmp_path, tiny_data):
    other = tmp_path / "linear.ckpt"
    torch.save(nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, 3)).state_dict(), other)
    result = run_script("tester.py", "--checkpoint", other, "--data", tiny_data, "--out", tmp_path, cwd=tmp_path)
    _assert_one_line_error(result, other)
    assert "SimpleModel" in result.stderr


def test_error_file_that_is_no_checkpoint(tmp_path, tiny_data):
    # A data pickle passed as the checkpoint: torch's own warning must not add lines.
    result = run_script("tester.py", "--checkpoint", tiny_data, "--data", tiny_data, "--out", tmp_path, cwd=tmp_path)
    _assert_one_line_error(result, tiny_data)


@pytest.mark.parametrize("damage", ["truncated", "garbage"])
def test_error_corrupt_data_pickle(tmp_path, good_checkpoint, tiny_data, damage):
    corrupt = tmp_path / "corrupt.pickle"
    data = tiny_data.read_bytes()
    corrupt.write_bytes(data[: len(data) // 2] if damage == "truncated" else b"not a pickle at all")
    result = run_script("tester.py", "--checkpoint", good_checkpoint, "--data", corrupt, "--out", tmp_path,
                        cwd=tmp_path)
    _assert_one_line_error(result, corrupt)
    assert not list(tmp_path.glob("metrics_*.json"))


def test_error_missing_data_file(tmp_path, good_checkpoint):
    missing = tmp_path / "no_such_dev.pickle"
    result = run_script("tester.py", "--checkpoint", good_checkpoint, "--data", missing, "--out", tmp_path,
                        cwd=tmp_path)
    _assert_one_line_error(result, missing)


def test_error_out_is_a_file(tmp_path, good_checkpoint, tiny_data):
    result = run_script("tester.py", "--checkpoint", good_checkpoint, "--data", tiny_data, "--out", tiny_data,
                        cwd=tmp_path)
    _assert_one_line_error(result, tiny_data)


@needs_cifar
def test_committed_pretrained_checkpoint_says_car_for_nearly_everything(default_data, tmp_path):
    # The shipped model reproduces the seed's observation on the built default dev set.
    result = run_script("tester.py", "--checkpoint", ROOT / "checkpoints" / "pre_trained.ckpt",
                        "--data", default_data / "dev.pickle", "--out", tmp_path, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    record = json.loads((tmp_path / "metrics_pre_trained.json").read_text())
    assert record["predicted_counts"]["car"] >= 0.95 * record["n"]
    assert record["per_class"]["car"]["accuracy"] >= 0.95
    assert record["per_class"]["truck"]["accuracy"] <= 0.05 and record["per_class"]["cat"]["accuracy"] <= 0.05
