"""The course drop-in: code written against the course's models.py / dataset.py runs unchanged
on this project's modules and gives the same numbers as tester.py."""
import json
import os
import pickle
import subprocess
import sys

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, WeightedRandomSampler

from cli import UserError
from conftest import ROOT, assert_one_error_line, run_script
from dataset import MyDataset, get_dataset_as_array, get_dataset_as_torch_dataset, label_names, un_normalize_image
from models import ResNet8, SimpleModel

PRETRAINED = ROOT / "checkpoints" / "pre_trained.ckpt"


def random_items(n=10, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.rand(3, 32, 32, generator=g) * 2 - 1, i % 3) for i in range(n)]


def saved_model(path, seed=1, cls=SimpleModel):
    torch.manual_seed(seed)
    model = cls()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.2)
    model.save(path)
    return model


def same_weights(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


# ---------------------------------------------------------------------------
# models.py: save / load in the course's style


def test_instance_load_fills_this_model_and_returns_it(tmp_path):
    original = saved_model(tmp_path / "m.ckpt")
    net = SimpleModel()
    returned = net.load(tmp_path / "m.ckpt")  # course code ignores the return value
    assert returned is net
    assert same_weights(net, original)


@pytest.mark.parametrize("style", ["instance", "chained", "class", "class with instance"])
def test_no_way_of_calling_load_leaves_random_weights(tmp_path, style):
    original = saved_model(tmp_path / "m.ckpt")
    path = tmp_path / "m.ckpt"
    if style == "instance":
        net = SimpleModel()
        net.load(path)
    elif style == "chained":
        net = SimpleModel().load(path)
    elif style == "class":
        net = SimpleModel.load(path)
    else:
        net = SimpleModel()
        SimpleModel.load(net, path)
    assert same_weights(net, original)
    # The check can fail: a fresh model's weights differ from the file's.
    assert not same_weights(SimpleModel(), original)


def test_load_keeps_train_or_eval_mode_like_the_course(tmp_path):
    saved_model(tmp_path / "m.ckpt")
    net = SimpleModel()
    assert net.training
    net.load(tmp_path / "m.ckpt")
    assert net.training  # the course's load() does not switch modes; course code calls net.eval()
    net.eval()
    net.load(tmp_path / "m.ckpt")
    assert not net.training
    assert not SimpleModel.load(tmp_path / "m.ckpt").training  # a new model from the class is ready to predict


def test_save_writes_the_course_format(tmp_path):
    net = saved_model(tmp_path / "m.ckpt")
    ckpt = torch.load(tmp_path / "m.ckpt", weights_only=True)
    assert list(ckpt) == ["model_state_dict"]
    assert same_weights(net, _from_state(ckpt["model_state_dict"]))


def _from_state(state):
    model = SimpleModel()
    model.load_state_dict(state)
    return model


def test_instance_load_of_another_architecture_is_refused(tmp_path):
    saved_model(tmp_path / "r.ckpt", cls=ResNet8)
    with pytest.raises(UserError, match="resnet8"):
        SimpleModel().load(tmp_path / "r.ckpt")
    resnet = ResNet8()
    resnet.load(tmp_path / "r.ckpt")
    assert same_weights(resnet, ResNet8.load(tmp_path / "r.ckpt"))


def test_instance_load_follows_the_models_device(tmp_path):
    original = saved_model(tmp_path / "m.ckpt")
    net = SimpleModel().to(torch.float64)  # load_state_dict copies into the existing parameters
    net.load(tmp_path / "m.ckpt")
    assert net.conv1.weight.dtype == torch.float64
    assert torch.allclose(net.conv1.weight.float(), original.conv1.weight)


# ---------------------------------------------------------------------------
# dataset.py: the course's names


def test_label_names():
    assert label_names() == {0: "car", 1: "truck", 2: "cat"}


def test_get_dataset_as_array_gives_the_course_list(tmp_path):
    items = random_items(10)
    with open(tmp_path / "d.pickle", "wb") as f:
        pickle.dump(items, f)
    loaded = get_dataset_as_array(tmp_path / "d.pickle")
    assert isinstance(loaded, list) and len(loaded) == 10
    for (image, label), (want_image, want_label) in zip(loaded, items):
        assert type(label) is int and label == want_label
        assert image.dtype == torch.float32 and image.shape == (3, 32, 32)
        assert torch.equal(image, want_image)


def test_get_dataset_as_array_items_do_not_share_storage(tmp_path):
    """Course code pickles the list it got (after fixing labels, say): each image must pickle
    as itself, not as the whole data set it was sliced from."""
    items = random_items(40)
    with open(tmp_path / "d.pickle", "wb") as f:
        pickle.dump(items, f)
    loaded = get_dataset_as_array(tmp_path / "d.pickle")
    size = len(pickle.dumps(loaded))
    assert size < 1.2 * (tmp_path / "d.pickle").stat().st_size


def test_get_dataset_as_array_still_refuses_malicious_pickles(tmp_path):
    marker = tmp_path / "pwned"

    class RunsShell:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    with open(tmp_path / "evil.pickle", "wb") as f:
        pickle.dump([(RunsShell(), 0)], f)
    with pytest.raises(UserError, match="refused"):
        get_dataset_as_array(tmp_path / "evil.pickle")
    assert not marker.exists()


def test_mydataset_passes_the_whole_item_to_transform():
    items = random_items(4)
    seen = []

    def transform(item):
        seen.append(item)
        image, label = item
        return image.flip(2), label

    data = MyDataset(items, transform=transform)
    assert len(data) == 4
    image, label = data[1]
    assert seen == [items[1]] and label == items[1][1] and torch.equal(image, items[1][0].flip(2))
    assert MyDataset(items)[2] is items[2]


@pytest.mark.parametrize("batch_size", [1, 3, 64])
def test_mydataset_with_dataloader_and_weighted_sampler(tmp_path, batch_size):
    items = random_items(30)
    with open(tmp_path / "d.pickle", "wb") as f:
        pickle.dump(items, f)
    data = get_dataset_as_torch_dataset(tmp_path / "d.pickle")
    seen = 0
    for images, labels in DataLoader(data, batch_size=batch_size, shuffle=True):
        assert images.shape[1:] == (3, 32, 32) and images.dtype == torch.float32
        assert labels.dtype == torch.int64
        seen += len(labels)
    assert seen == 30
    weights = [1.0 / 10] * 30
    sampler = WeightedRandomSampler(weights, num_samples=30, replacement=True)
    assert sum(len(y) for _, y in DataLoader(data, batch_size=batch_size, sampler=sampler)) == 30


def test_un_normalize_image_for_imshow():
    image = torch.full((3, 32, 32), -1.0)
    image[0] = 1.0
    pixels = un_normalize_image(image)
    assert isinstance(pixels, np.ndarray) and pixels.shape == (32, 32, 3)
    assert pixels[..., 0].min() == 1.0 and pixels[..., 1].max() == 0.0
    assert np.array_equal(un_normalize_image(image.numpy()), pixels)


# ---------------------------------------------------------------------------
# torch version floor


def test_old_torch_is_refused_before_any_file_is_read(tmp_path):
    code = ("import sys, runpy, torch; torch.__version__ = '2.5.1'; sys.argv = ['tester.py'] + sys.argv[1:]; "
            f"runpy.run_path({str(ROOT / 'tester.py')!r}, run_name='__main__')")
    result = subprocess.run([sys.executable, "-c", code, "--checkpoint", str(tmp_path / "missing.ckpt")],
                            cwd=tmp_path, capture_output=True, text=True, timeout=120,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert_one_error_line(result, "torch 2.5.1", "upgrade", ">= 2.10")
    assert "missing.ckpt" not in result.stderr


def test_course_api_refuses_a_zip_checkpoint_on_an_old_torch(tmp_path, monkeypatch):
    # Course code calls SimpleModel().load directly, without a script's start-up check.
    SimpleModel().save(tmp_path / "m.ckpt")
    monkeypatch.setattr(torch, "__version__", "2.5.1")
    with pytest.raises(UserError, match="torch 2.5.1 is too old"):
        SimpleModel().load(tmp_path / "m.ckpt")
    monkeypatch.undo()
    SimpleModel().load(tmp_path / "m.ckpt")


def test_requirements_floor_torch_at_2_10():
    lines = (ROOT / "requirements.txt").read_text().splitlines()
    assert any(line.replace(" ", "").startswith("torch>=2.10") for line in lines)
    assert any(line.replace(" ", "").startswith("torchvision>=0.25") for line in lines)


# ---------------------------------------------------------------------------
# Course code end to end: the same numbers as tester.py


def test_course_code_runs_unchanged_and_agrees_with_tester(small_data, tmp_path):
    out = tmp_path / "course.ckpt"
    result = subprocess.run(
        [sys.executable, str(ROOT / "tests" / "course_code.py"), str(small_data / "train.pickle"),
         str(small_data / "dev.pickle"), str(PRETRAINED), str(out)],
        cwd=tmp_path, capture_output=True, text=True, timeout=600,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert result.returncode == 0, result.stderr
    course = json.loads(result.stdout)
    for name, ckpt in (("pretrained", PRETRAINED), ("trained", out)):
        tested = run_script("tester.py", "--checkpoint", ckpt, "--data", small_data / "dev.pickle",
                            "--out", tmp_path / name, cwd=tmp_path)
        assert tested.returncode == 0, tested.stderr
        metrics = json.loads((tmp_path / name / f"metrics_{ckpt.stem}.json").read_text())
        for cls, accuracy in course[name]["per_class"].items():
            assert metrics["per_class"][cls]["accuracy"] == pytest.approx(accuracy, abs=1e-12), (name, cls)
        assert metrics["balanced_accuracy"] == pytest.approx(course[name]["balanced"], abs=1e-12)
        assert metrics["accuracy"] == pytest.approx(course[name]["accuracy"], abs=1e-12)
    # The shipped model says "car" for everything; the one-epoch model learned something.
    assert course["pretrained"]["per_class"] == {"car": 1.0, "truck": 0.0, "cat": 0.0}
    assert course["trained"]["balanced"] > 0.45


# ---------------------------------------------------------------------------
# Round two: what published student code does (tests/course_scripts/, one script per behaviour)


def course_script(name, *args, cwd):
    """Run tests/course_scripts/<name>.py as student code runs: its own process, the project on the path."""
    result = subprocess.run([sys.executable, str(ROOT / "tests" / "course_scripts" / f"{name}.py"), *map(str, args)],
                            cwd=cwd, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_star_import_brings_numpy_torch_pickle_and_dataset(small_data, tmp_path):
    out = course_script("star_import", small_data / "train.pickle", cwd=tmp_path)
    from dataset import load_pickle

    images, labels = load_pickle(small_data / "train.pickle")
    assert out["counts"] == torch.bincount(labels, minlength=3).tolist()
    assert out["mean"] == pytest.approx(labels.double().mean().item())
    assert out["pixels"] == pytest.approx(images.mean().item(), abs=1e-6)
    assert out["dataset_class"] is True and out["pickle"] == pickle.HIGHEST_PROTOCOL


def test_a_pickled_mydataset_loads_back_as_data(small_data, tmp_path):
    assert course_script("pickled_dataset", small_data / "train.pickle", tmp_path / "clean.pickle",
                         cwd=tmp_path) == {"course": True, "own": True}


def test_numpy_labels_numpy_images_and_batches_of_one_load(small_data, tmp_path):
    out = course_script("numpy_labels", small_data / "train.pickle", tmp_path / "mine.pickle", cwd=tmp_path)
    assert out == {"numpy int64 labels": True, "one-element label tensors": True, "numpy images": True,
                   "batch-of-one images": True}


def test_one_unbatched_image_gives_one_row_of_scores(small_data, tmp_path):
    out = course_script("unbatched_forward", small_data / "dev.pickle", PRETRAINED, cwd=tmp_path)
    assert out["shape"] == [1, 3] and out["same_as_batched"] is True and out["prediction"] == 0  # "car", as always


def test_dropout1_and_dropout2_as_in_the_course_model_with_the_same_outputs(tmp_path):
    out = course_script("dropouts", cwd=tmp_path)
    assert out["same"] == {"train": True, "eval": True}  # bit for bit, dropout draws included
    assert out["p"] == [0.2, 0.5]
    assert {"dropout1", "dropout2"} <= set(out["modules"]) and "dropout" not in out["modules"]


def test_a_missing_file_is_a_file_not_found_error(tmp_path):
    out = course_script("missing_file", cwd=tmp_path)
    assert set(out) == {"get_dataset_as_array", "get_dataset_as_torch_dataset", "load"}
    assert "no_such/train.pickle: no such data file" in out["get_dataset_as_array"]
    assert "no_such/model.ckpt: no such checkpoint file" in out["load"]


def test_the_course_default_path_and_its_fallback(small_data, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "train.pickle").symlink_to(small_data / "train.pickle")
    from dataset import load_pickle

    train = load_pickle(small_data / "train.pickle")
    assert len(get_dataset_as_array()) == len(train[1])  # no ./data/dataset.pickle: the training set
    (tmp_path / "data" / "dataset.pickle").symlink_to(small_data / "dev.pickle")
    assert len(get_dataset_as_torch_dataset()) == len(load_pickle(small_data / "dev.pickle")[1])  # the course's
