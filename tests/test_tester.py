"""tester.py: metrics on a hand-checked case, the figure and JSON it writes, and one-line CLI errors."""
import json
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn

import dataset
import metrics
import models
import tester
from cli import UserError
from sklearn.metrics import accuracy_score, balanced_accuracy_score, confusion_matrix

from conftest import ROOT, needs_cifar, run_script, softmax_by_hand

def test_plot_confusion_accepts_a_bare_matrix(tmp_path):
    path = tmp_path / "sub" / "cm.png"
    tester.plot_confusion([[3, 1, 0], [0, 0, 0], [1, 0, 1]], path, "empty truck row")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError):
        tester.plot_confusion([[1, 2], [3, 4]], tmp_path / "bad.png", "2x2")


def _expected_metrics(checkpoint, data):
    """The metrics of the plain model, from probabilities computed here rather than by models.predict."""
    images, labels = dataset.load_pickle(data)
    return metrics.compute_metrics(labels, softmax_by_hand(models.load_model(checkpoint), images).argmax(1))


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
                            "per_class", "confusion_matrix", "predicted_counts", "most_confused", "calibration",
                            "mistakes"]
    assert record["checkpoint"] == "checkpoints/pre_trained.ckpt"
    assert record["data"] == "data/dev.pickle"
    assert record["tta"] == "none"
    assert record["n"] == 210
    assert {k: v["support"] for k, v in record["per_class"].items()} == {"car": 100, "truck": 50, "cat": 60}
    assert sum(map(sum, record["confusion_matrix"])) == 210
    expected = _expected_metrics(tmp_path / "checkpoints" / "pre_trained.ckpt", small_data / "dev.pickle")
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


def test_flip_tta_in_process(briefly_trained, small_data, tmp_path, capsys):
    # The oracle is written here: the mean of the softmax for each image and for its mirror
    # image. A flip on the wrong axis, or logits averaged instead of probabilities, fails.
    model, ckpt, images, labels = briefly_trained
    tester.main(["--checkpoint", str(ckpt), "--data", str(small_data / "dev.pickle"), "--out", str(tmp_path),
                 "--tta", "flip", "--mistakes", "1000"])
    assert "flip" in capsys.readouterr().out
    record = json.loads((tmp_path / f"metrics_{ckpt.stem}.json").read_text())
    assert record["tta"] == "flip"
    probs = softmax_by_hand(model, images, flip=True).double()
    predicted = probs.argmax(1)
    plain = softmax_by_hand(model, images).argmax(1)
    assert (predicted != plain).sum() >= 3  # the averaging changes answers: the test can tell it from none
    assert record["accuracy"] == pytest.approx(accuracy_score(labels, predicted))
    assert record["balanced_accuracy"] == pytest.approx(balanced_accuracy_score(labels, predicted))
    assert record["confusion_matrix"] == confusion_matrix(labels, predicted, labels=[0, 1, 2]).tolist()
    # Every mistake's probabilities are the averaged softmax's.
    errors = (predicted != labels).nonzero()[:, 0].tolist()
    assert sorted(m["index"] for m in record["mistakes"]) == errors
    for m in record["mistakes"]:
        assert m["probability"] == pytest.approx(probs[m["index"]].max().item(), abs=1e-6)
        assert m["loss"] == pytest.approx(-probs[m["index"], labels[m["index"]]].log().item(), abs=1e-5)


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
def test_committed_pretrained_checkpoint_says_car_for_all_1750_dev_images(default_data, tmp_path):
    # README: the shipped model "predicts "car" for all 1,750 dev images", and its row of the
    # table: car 1.000, truck 0.000, cat 0.000, balanced 0.333.
    result = run_script("tester.py", "--checkpoint", ROOT / "checkpoints" / "pre_trained.ckpt",
                        "--data", default_data / "dev.pickle", "--out", tmp_path, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    record = json.loads((tmp_path / "metrics_pre_trained.json").read_text())
    assert record["n"] == 1750 and record["predicted_counts"] == {"car": 1750, "truck": 0, "cat": 0}
    assert {name: c["accuracy"] for name, c in record["per_class"].items()} == {"car": 1.0, "truck": 0.0, "cat": 0.0}
    assert record["balanced_accuracy"] == pytest.approx(1 / 3)
    assert "balanced accuracy   33.33%" in result.stdout


# ---------------------------------------------------------------------------
# Seeing the mistakes: most-confused pairs, the highest-loss errors, calibration, Grad-CAM

PNG = b"\x89PNG\r\n\x1a\n"


def _tester(tmp_path, checkpoint, *args):
    result = run_script("tester.py", "--checkpoint", checkpoint, "--out", tmp_path / "out", *args, cwd=tmp_path,
                        env={"OMP_NUM_THREADS": "1"}, timeout=120)
    assert result.returncode == 0, result.stderr
    return result


def test_report_names_the_confused_pairs_and_the_highest_loss_mistakes(briefly_trained, small_data, tmp_path):
    model, checkpoint = briefly_trained[:2]
    data = small_data / "dev.pickle"
    result = _tester(tmp_path, checkpoint, "--data", data)
    record = json.loads((tmp_path / "out" / "metrics_briefly.json").read_text())

    cm = record["confusion_matrix"]
    assert {(p["true"], p["predicted"]): p["count"] for p in record["most_confused"]} == {
        (t, p): cm[i][j] for i, t in enumerate(dataset.CLASSES) for j, p in enumerate(dataset.CLASSES)
        if i != j and cm[i][j]}
    assert [p["count"] for p in record["most_confused"]] == sorted((p["count"] for p in record["most_confused"]),
                                                                   reverse=True)
    top = record["most_confused"][0]
    assert f"{top['true']} -> {top['predicted']}" in result.stdout.split("most confused")[1]

    # The mistakes: the errors with the highest -log p(true class), in order, 24 by default.
    images, labels = dataset.load_pickle(data)
    probs = models.predict(model, images, probabilities=True).double()
    loss = -probs[torch.arange(len(labels)), labels].log()
    errors = (models.predict(model, images) != labels).nonzero()[:, 0]
    expected = sorted(errors.tolist(), key=lambda i: (-loss[i].item(), i))[:24]
    assert len(errors) > 24
    assert [m["index"] for m in record["mistakes"]] == expected
    for m in record["mistakes"]:
        assert m["true"] == dataset.CLASSES[labels[m["index"]]] != m["predicted"]
        assert m["probability"] == pytest.approx(probs[m["index"]].max().item(), abs=1e-6)
        assert m["loss"] == pytest.approx(loss[m["index"]].item(), abs=1e-5)

    # Calibration: in the table and the JSON, and as a reliability diagram.
    assert f"calibration error  {record['calibration']['ece']:7.2%}" in result.stdout
    assert record["calibration"]["bins"] == 15 and sum(record["calibration"]["curve"]["count"]) == record["n"]
    for name in ("mistakes", "calibration", "confusion"):
        assert (tmp_path / "out" / f"{name}_briefly.png").read_bytes()[:8] == PNG


def test_mistakes_0_draws_and_lists_none(briefly_trained, small_data, tmp_path):
    _tester(tmp_path, briefly_trained[1], "--data", small_data / "dev.pickle", "--mistakes", 0)
    record = json.loads((tmp_path / "out" / "metrics_briefly.json").read_text())
    assert "mistakes" not in record and record["most_confused"]
    assert not (tmp_path / "out" / "mistakes_briefly.png").exists()


def _photo_folder(root, images, labels, count=12):
    """The first `count` images as PNG files (lossless) in class subfolders, named after their index."""
    from images import to_unit
    from PIL import Image

    for i in range(count):
        folder = root / dataset.CLASSES[labels[i]]
        folder.mkdir(parents=True, exist_ok=True)
        pixels = (to_unit(images[i]).clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy()
        Image.fromarray(pixels).save(folder / f"dev ${i:03d}\\x$.png")  # "$": not TeX in the figure
    return root


def test_skip_bad_with_a_photo_folder_leaves_the_bad_file_out_and_names_it(briefly_trained, small_data, tmp_path):
    # README: with --data FOLDER "a bad file ... is one error: line naming it, or with --skip-bad one warning".
    images, labels = dataset.load_pickle(small_data / "dev.pickle")
    order = torch.cat([(labels == c).nonzero()[:3, 0] for c in range(3)])  # 3 of each class
    folder = _photo_folder(tmp_path / "photos", images[order], labels[order], count=9)
    bad = folder / "truck" / "broken.png"
    bad.write_bytes(b"not an image at all")
    result = run_script("tester.py", "--checkpoint", briefly_trained[1], "--out", tmp_path / "out", "--data", folder,
                        cwd=tmp_path, env={"OMP_NUM_THREADS": "1"}, timeout=120)
    assert result.returncode == 1 and not (tmp_path / "out" / "metrics_briefly.json").exists()
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"tester.py: error: {bad}: ") and "--skip-bad" in lines[0], \
        result.stderr

    result = _tester(tmp_path, briefly_trained[1], "--data", folder, "--skip-bad")
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 2 and lines[0].startswith(f"warning: {bad}: ") and lines[0].endswith("; skipped"), \
        result.stderr
    assert lines[1] == "warning: skipped 1 of 10 files (bad images, each named above)"
    record = json.loads((tmp_path / "out" / "metrics_briefly.json").read_text())
    assert [s["path"] for s in record["skipped"]] == [str(bad)]
    assert record["n"] == 9 and [sum(row) for row in record["confusion_matrix"]] == [3, 3, 3]
    # The nine good photos are scored as the model scores them.
    assert record["confusion_matrix"] == metrics.compute_metrics(
        labels[order], softmax_by_hand(briefly_trained[0], images[order]).argmax(1))["confusion_matrix"]


def test_explain_with_a_photo_folder_and_flip_names_the_files(briefly_trained, small_data, tmp_path):
    images, labels = dataset.load_pickle(small_data / "dev.pickle")
    order = torch.cat([(labels == c).nonzero()[:, 0] for c in range(3)])  # some of each class
    folder = _photo_folder(tmp_path / "photos", images[order[::10]], labels[order[::10]], count=21)
    _tester(tmp_path, briefly_trained[1], "--data", folder, "--explain", "--tta", "flip", "--mistakes", 100)
    record = json.loads((tmp_path / "out" / "metrics_briefly.json").read_text())
    errors = sum(p["count"] for p in record["most_confused"])
    assert 0 < len(record["mistakes"]) == errors < 100  # K larger than the errors: all of them
    for m in record["mistakes"]:
        path = Path(m["file"])
        assert path.is_file() and path.parent.name == m["true"]
    assert (tmp_path / "out" / "mistakes_briefly.png").read_bytes()[:8] == PNG


def test_explain_a_single_image_and_a_perfect_model(briefly_trained, small_data, tmp_path):
    model, checkpoint = briefly_trained[:2]
    images, _ = dataset.load_pickle(small_data / "dev.pickle")
    _photo_folder(tmp_path / "one", images[:1], torch.zeros(1, dtype=torch.long), count=1)
    _tester(tmp_path, checkpoint, "--images", tmp_path / "one" / "car", "--explain")
    assert json.loads((tmp_path / "out" / "predictions.json").read_text())["n"] == 1
    assert (tmp_path / "out" / "predictions.png").read_bytes()[:8] == PNG

    # Labels that are the model's own predictions: no mistakes to draw or explain.
    perfect = tmp_path / "perfect.pickle"
    dataset.save_pickle(perfect, images[:30], models.predict(model, images[:30]))
    result = _tester(tmp_path, checkpoint, "--data", perfect, "--explain")
    record = json.loads((tmp_path / "out" / "metrics_briefly.json").read_text())
    assert record["accuracy"] == 1 and record["mistakes"] == [] and record["most_confused"] == []
    assert "every image is predicted right" in result.stdout
    assert (tmp_path / "out" / "mistakes_briefly.png").read_bytes()[:8] == PNG


def test_explain_draws_grad_cam_for_the_mistakes_in_process(briefly_trained, small_data, tmp_path, monkeypatch):
    import explain

    calls = []
    real = explain.grad_cam

    def spy(model, images, targets, device, flip=False):
        calls.append((images.clone(), torch.as_tensor(targets).clone(), flip, model.training))
        return real(model, images, targets, device, flip=flip)

    monkeypatch.setattr(explain, "grad_cam", spy)
    tester.main(["--checkpoint", str(briefly_trained[1]), "--data", str(small_data / "dev.pickle"), "--out",
                 str(tmp_path), "--explain", "--mistakes", "5", "--tta", "flip"])
    record = json.loads((tmp_path / "metrics_briefly.json").read_text())
    images, _ = dataset.load_pickle(small_data / "dev.pickle")
    (explained, targets, flip, training), = calls
    assert torch.equal(explained, images[[m["index"] for m in record["mistakes"]]])
    assert [dataset.CLASSES[t] for t in targets] == [m["predicted"] for m in record["mistakes"]]
    assert flip and not training


@pytest.mark.parametrize("args,words", [
    (["--explain", "--mistakes", "0"], "nothing to draw"),
    (["--images", "a.png", "--mistakes", "3"], "--mistakes applies to an evaluation"),
    (["--mistakes", "-1"], "--mistakes"),
])
def test_mistakes_and_explain_flag_errors_are_one_line(args, words, good_checkpoint, tiny_data, tmp_path):
    data = [] if "--images" in args else ["--data", tiny_data]
    result = run_script("tester.py", "--checkpoint", good_checkpoint, *data, *args, "--out", tmp_path, cwd=tmp_path)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and words in result.stderr, result.stderr


def test_missing_captum_stops_explain_before_any_work(good_checkpoint, tiny_data, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "captum.attr", None)  # as if Captum were not installed
    with pytest.raises(UserError, match="--explain needs Captum"):
        tester.main(["--checkpoint", str(good_checkpoint), "--data", str(tiny_data), "--out", str(tmp_path),
                     "--explain"])
    assert not list(tmp_path.glob("metrics_*.json"))
    tester.main(["--checkpoint", str(good_checkpoint), "--data", str(tiny_data), "--out", str(tmp_path)])
    assert (tmp_path / "mistakes_good.png").is_file()  # plain tester.py never needs it
