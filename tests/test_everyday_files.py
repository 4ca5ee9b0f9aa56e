"""Everyday files: data pickles and checkpoints written the ordinary ways load, and give what the
same images and weights give in the course's own format.

The data corpus is made once per session from the default training set (real CIFAR-10 photos):
at full size for every way of writing whose refusal depended on the file's size (a data pickle's
instructions per byte), and for every way a small subset that tester.py and trainer.py read as
scripts. The checkpoints hold one briefly trained model in the layouts of common training code.
"""
import collections
import json
import pickle

import pytest
import torch
import torch.nn as nn

import dataset
import models
from cli import UserError
from conftest import needs_cifar, run_script
from everyday_data import WRITERS, dataloader_views
from untrusted import read_checkpoint

pytestmark = needs_cifar

# ---------------------------------------------------------------------------
# Data: the ways people write course data (tests/everyday_data.py)

# At full size: the ways whose refusal depended on the file's size (instructions per byte of file).
FULL_SIZE = [name for name in WRITERS if name.startswith(("DataLoader", "items sliced", "labels made"))]
LARGER = "DataLoader views, larger than train.pickle (train and dev)"
SMALL_PER_CLASS = 16


def dump(path, obj, protocol):
    with open(path, "wb") as f:
        pickle.dump(obj, f, protocol=protocol)
    return path


def read_as_written(path):
    """(images float32, labels int64) of a course data pickle this session's `dataset.py build` wrote, read with
    plain pickle.load (the file is our own), never by the loader under test: what the everyday files are written
    from, and what loading them must give."""
    with open(path, "rb") as f:
        items = pickle.load(f)
    return torch.stack([image for image, _ in items]).float(), torch.tensor([label for _, label in items])


@pytest.fixture(scope="session")
def everyday_data(default_data, tmp_path_factory):
    """{variant: (full-size file or None, small file)}, the images and labels each holds in the
    course format, and a small course-format file of the small files' images."""
    out = tmp_path_factory.mktemp("everyday_data")
    train = read_as_written(default_data / "train.pickle")
    larger = tuple(torch.cat(pair) for pair in zip(train, read_as_written(default_data / "dev.pickle")))
    chosen = torch.cat([(train[1] == c).nonzero().flatten()[:SMALL_PER_CLASS] for c in range(3)])
    small = train[0][chosen], train[1][chosen]
    dataset.save_pickle(out / "small course.pickle", *small)
    files, views = {}, None
    for i, (name, (make, protocol)) in enumerate({**WRITERS, LARGER: (dataloader_views, 4)}.items()):
        source, full = larger if name == LARGER else train, None
        if name in FULL_SIZE or name == LARGER:
            if make is dataloader_views and source is train:  # one DataLoader pass for all its protocols
                views = views or dataloader_views(*train)
            full = dump(out / f"full {i}.pickle", views if make is dataloader_views and source is train
                        else make(*source), protocol)
        files[name] = (full, dump(out / f"small {i}.pickle", make(*small), protocol), source)
    return {"files": files, "small": small, "small course": out / "small course.pickle"}


@pytest.mark.parametrize("name", FULL_SIZE + [LARGER])
def test_everyday_data_loads_at_full_size(everyday_data, name):
    full, _, (images, labels) = everyday_data["files"][name]
    loaded_images, loaded_labels = dataset.load_pickle(full)
    assert len(labels) >= 6400 and full.stat().st_size > 75 * 2**20
    assert loaded_images.dtype == torch.float32 and loaded_labels.dtype == labels.dtype == torch.int64
    assert torch.equal(loaded_images, images) and torch.equal(loaded_labels, labels)


def test_the_densest_everyday_file_uses_under_a_quarter_of_each_limit(everyday_data):
    # Protocol 0 with DataLoader views runs the most instructions per byte of file (one per 197 bytes;
    # docs/untrusted_files.md has every way's numbers, from bench/untrusted_budgets.py).
    import io

    from pickled_data import data_pickle_globals
    from restricted_pickle import Budget, RestrictedUnpickler

    data = everyday_data["files"]["DataLoader views, protocol 0"][0].read_bytes()
    budget = Budget(len(data), "course data pickle")
    items = RestrictedUnpickler(io.BytesIO(data), data_pickle_globals(budget), budget).load()
    assert len(items) == 6400
    assert budget.instructions_used() < budget.instruction_limit / 4
    assert budget.tensors_used() < budget.tensor_limit / 4
    assert budget.data_again == 0 and budget.decoded_bytes < len(data) and budget.storage_bytes < len(data)


@pytest.mark.parametrize("name", list(WRITERS))
def test_everyday_data_gives_the_course_formats_images(everyday_data, name):
    images, labels = everyday_data["small"]
    loaded_images, loaded_labels = dataset.load_pickle(everyday_data["files"][name][1])
    # float64 images too: rounding them back loses nothing
    assert loaded_images.dtype == torch.float32 and loaded_labels.dtype == labels.dtype == torch.int64
    assert torch.equal(loaded_images, images) and torch.equal(loaded_labels, labels)


@pytest.fixture(scope="session")
def course_format_runs(everyday_data, briefly_trained, tmp_path_factory):
    """What tester.py and trainer.py give on the small course-format file: tester's report and the
    trained weights."""
    out = tmp_path_factory.mktemp("course_runs")
    return report_of_tester(briefly_trained[1], everyday_data["small course"], out)[0], \
        weights_trained_on(everyday_data["small course"], everyday_data["small course"], out)


def report_of_tester(checkpoint, data, out):
    """tester.py's report on data (what it scored, every figure left out but its paths), and its stderr."""
    out.mkdir(exist_ok=True)
    result = run_script("tester.py", "--checkpoint", checkpoint, "--data", data, "--out", out, "--mistakes", "0", cwd=out)
    assert result.returncode == 0, result.stderr
    report = json.loads((out / f"metrics_{checkpoint.stem}.json").read_text())
    return {k: v for k, v in report.items() if k not in ("checkpoint", "data")}, result.stderr


def weights_trained_on(data, dev_data, out):
    result = run_script("trainer.py", "--data", data, "--dev-data", dev_data, "--epochs", "1", "--out",
                        out / "m.ckpt", "--figures", out / "fig", cwd=out)
    assert result.returncode == 0, result.stderr
    return torch.load(out / "m.ckpt", weights_only=True)["model_state_dict"]


@pytest.mark.parametrize("name", list(WRITERS))
def test_tester_and_trainer_read_everyday_data_as_the_course_format(everyday_data, course_format_runs,
                                                                     briefly_trained, name, tmp_path):
    report, weights = course_format_runs
    small = everyday_data["files"][name][1]
    assert report_of_tester(briefly_trained[1], small, tmp_path)[0] == report  # predictions, calibration
    trained = weights_trained_on(small, everyday_data["small course"], tmp_path)
    assert all(torch.equal(trained[k], v) for k, v in weights.items())


def test_tester_reads_a_full_size_dataloader_set(everyday_data, briefly_trained, tmp_path):
    # The file of the report: a student's cleaned set, 6,400 DataLoader views in a MyDataset.
    full = everyday_data["files"]["DataLoader views in a MyDataset"][0]
    result = run_script("tester.py", "--checkpoint", briefly_trained[1], "--data", full, "--out", tmp_path,
                        "--mistakes", "0", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert json.loads((tmp_path / f"metrics_{briefly_trained[1].stem}.json").read_text())["n"] == 6400


# ---------------------------------------------------------------------------
# Checkpoints: the layouts of common training code


def trained_states(model):
    """An Adam and an SGD state after a step, and two schedulers' states, as training loops save them."""
    adam = torch.optim.Adam(model.parameters(), 1e-3)
    sgd = torch.optim.SGD(model.parameters(), 0.1, momentum=0.9)
    cycle = torch.optim.lr_scheduler.OneCycleLR(adam, 1e-3, total_steps=10)
    steps = torch.optim.lr_scheduler.StepLR(sgd, 3)
    for optimizer in (adam, sgd):
        model.zero_grad()
        model(torch.rand(2, 3, 32, 32)).sum().backward()
        optimizer.step()
    cycle.step()
    steps.step()
    model.zero_grad()
    return adam.state_dict(), sgd.state_dict(), cycle.state_dict(), steps.state_dict()


def ddp_state_dict(model, tmp_path):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        return nn.parallel.DistributedDataParallel(model).state_dict()
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="session")
def layouts(briefly_trained, tmp_path_factory):
    """{layout: (checkpoint, note it prints or None, what was saved)} for one briefly trained model."""
    out = tmp_path_factory.mktemp("layouts")
    model = briefly_trained[0]
    state = model.state_dict()
    copy = models.SimpleModel()
    copy.load_state_dict(state)
    adam, sgd, cycle, steps = trained_states(copy)  # the optimizers step a copy: the weights stay
    wrapped = nn.DataParallel(model).state_dict()
    fresh = models.SimpleModel()  # DistributedDataParallel hooks into the model it wraps: not the shared one
    fresh.load_state_dict(state)
    saved = {
        "course": {"model_state_dict": state},
        "DataParallel state_dict": wrapped,
        "DistributedDataParallel state_dict": ddp_state_dict(fresh, out),
        "torch.compile state_dict": torch.compile(model).state_dict(),
        "tutorial checkpoint": {"epoch": 5, "model_state_dict": state, "optimizer_state_dict": adam, "loss": 0.25},
        "'state_dict' of a wrapped model": {"epoch": 5, "state_dict": wrapped, "optimizer": sgd, "scheduler": cycle,
                                           "best_acc1": torch.tensor(0.5)},
        "torchvision reference checkpoint": {"model": state, "optimizer": sgd, "lr_scheduler": steps, "epoch": 7},
    }
    notes = [None, "a bare state_dict (module. prefix stripped)", "a bare state_dict (module. prefix stripped)",
             "a bare state_dict (_orig_mod. prefix stripped)",
             "'model_state_dict' (left out: 'epoch', 'optimizer_state_dict', 'loss')",
             "'state_dict' (module. prefix stripped; left out: 'epoch', 'optimizer', 'scheduler', 'best_acc1')",
             "'model' (left out: 'optimizer', 'lr_scheduler', 'epoch')"]
    found = {}
    for i, ((name, obj), note) in enumerate(zip(saved.items(), notes)):
        for legacy in (False, True):
            path = out / f"{'legacy' if legacy else 'zip'}{i}.ckpt"
            torch.save(obj, path, _use_new_zipfile_serialization=not legacy)
            found[f"{name}, {'legacy' if legacy else 'zip'}"] = (
                path, note and f"note: {path}: read the weights from {note}", obj)
    return found


def same_contents(a, b):
    """Whether two loaded objects hold the same values (tensors equal, containers alike)."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and list(a) == list(b) and all(same_contents(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(map(same_contents, a, b))
    return type(a) is type(b) and a == b


@pytest.mark.parametrize("layout", ["course, zip", "DataParallel state_dict, zip", "DataParallel state_dict, legacy",
                                    "DistributedDataParallel state_dict, zip", "torch.compile state_dict, zip",
                                    "tutorial checkpoint, zip", "tutorial checkpoint, legacy",
                                    "'state_dict' of a wrapped model, zip", "'state_dict' of a wrapped model, legacy",
                                    "torchvision reference checkpoint, zip", "torchvision reference checkpoint, legacy"])
def test_checkpoint_layout_loads_in_the_course_api_and_trainers_check(layouts, layout, briefly_trained, small_data,
                                                                        capsys):
    from metrics import compute_metrics
    from resume_state import check_kept_checkpoint

    path, note, saved = layouts[layout]
    capsys.readouterr()
    net = models.SimpleModel()
    net.load(path)  # the course's API
    assert same_contents(net.state_dict(), briefly_trained[0].state_dict())
    assert capsys.readouterr().err == (f"{note}\n" if note else "")
    # What the file holds beside the weights (optimizer and scheduler states, epochs, losses) passes
    # the restricted reader and torch.load(weights_only=True) unchanged.
    assert same_contents(read_checkpoint(path), saved)
    if "zip" in layout:
        assert same_contents(torch.load(path, weights_only=True), saved)
    # trainer.py --resume --select best-val scores the kept checkpoint again: it must read it too, and reach
    # the score its weights reach.
    val_x, val_y = dataset.load_pickle(small_data / "dev.pickle")
    best = {"epoch": 1, "score": compute_metrics(val_y, models.predict(briefly_trained[0], val_x))["balanced_accuracy"]}
    check_kept_checkpoint(best, path, val_x, val_y, "cpu", "m.resume.pt")


def test_tester_reads_every_layout(layouts, small_data, tmp_path):
    reference, _ = report_of_tester(layouts["course, zip"][0], small_data / "dev.pickle", tmp_path / "course")
    for layout in ("DataParallel state_dict, zip", "torch.compile state_dict, legacy",
                   "'state_dict' of a wrapped model, zip", "torchvision reference checkpoint, legacy"):
        path, note, _ = layouts[layout]
        report, stderr = report_of_tester(path, small_data / "dev.pickle", tmp_path / path.stem)
        assert stderr.splitlines()[0] == note
        assert report == reference, layout


def test_adversarial_example_reads_every_layout(layouts, small_data, tmp_path):
    names = ["course, zip", "DistributedDataParallel state_dict, legacy", "tutorial checkpoint, zip",
             "'state_dict' of a wrapped model, legacy", "torchvision reference checkpoint, zip"]
    paths = [layouts[name][0] for name in names]
    result = run_script("adversarialExample.py", "--compare", *paths, "--transfer-from",
                        layouts["torch.compile state_dict, zip"][0], "--data", small_data / "dev.pickle",
                        "--epsilons", "0", "0.03", "--out", tmp_path, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    notes = [layouts[name][1] for name in names[1:]] + [layouts["torch.compile state_dict, zip"][1]]
    assert sorted(line for line in result.stderr.splitlines() if line.startswith("note: ")) == sorted(notes)
    summaries = list(json.loads((tmp_path / "compare.json").read_text())["models"].values())
    assert len(summaries) == 5 and all(s == summaries[0] for s in summaries)


def test_whole_pickled_model_is_refused_with_what_to_save_instead(briefly_trained, tmp_path):
    for legacy in (False, True):
        path = tmp_path / f"whole{legacy}.pt"
        torch.save(briefly_trained[0], path, _use_new_zipfile_serialization=not legacy)
        expected = (f"{path}: refused: it holds a whole pickled model (models.SimpleModel), and loading one runs its "
                    "code; save the weights instead, with torch.save(model.state_dict(), path) in the code that made it")
        with pytest.raises(UserError) as refused:
            models.SimpleModel().load(path)
        assert str(refused.value) == expected
        for script in ("tester.py", "adversarialExample.py"):
            result = run_script(script, "--checkpoint", path, "--out", tmp_path, cwd=tmp_path)
            assert result.returncode == 1 and result.stderr == f"{script}: error: {expected}\n"
    # Inside a dict as well: torch.save({"model": model, "epoch": 3}) is refused the same way.
    path = tmp_path / "in_dict.pt"
    torch.save({"model": briefly_trained[0], "epoch": 3}, path)
    with pytest.raises(UserError) as refused:
        models.load_model(path)
    assert str(refused.value) == expected.replace(str(tmp_path / "wholeTrue.pt"), str(path))


def test_a_prefix_on_only_some_keys_is_refused(briefly_trained, tmp_path):
    state = collections.OrderedDict((f"module.{k}" if k.startswith("fc") else k, v)
                                    for k, v in briefly_trained[0].state_dict().items())
    path = tmp_path / "mixed.ckpt"
    torch.save({"state_dict": state}, path)
    expected = (f"{path}: 6 of the state_dict's 10 keys start with 'module.' and the others do not (such as "
                "'conv1.weight'); a wrapper (DataParallel, DistributedDataParallel) puts it on every key, so these "
                "are not one model's weights: save them again with torch.save(model.state_dict(), path)")
    with pytest.raises(UserError) as refused:
        models.SimpleModel().load(path)
    assert str(refused.value) == expected
    result = run_script("tester.py", "--checkpoint", path, "--out", tmp_path, cwd=tmp_path)
    assert result.returncode == 1 and result.stderr == f"tester.py: error: {expected}\n"
    # Every key prefixed: stripped, and the weights are the model's.
    torch.save({"state_dict": {f"module.{k}": v for k, v in briefly_trained[0].state_dict().items()}}, path)
    assert same_contents(models.load_model(path).state_dict(), briefly_trained[0].state_dict())


def test_a_layout_whose_weights_do_not_fit_is_one_line_and_no_note(tmp_path):
    path = tmp_path / "linear.ckpt"
    torch.save({"state_dict": nn.DataParallel(nn.Linear(4, 2)).state_dict(), "epoch": 1}, path)
    result = run_script("tester.py", "--checkpoint", path, "--out", tmp_path, cwd=tmp_path)
    assert result.returncode == 1 and result.stderr == (
        f"tester.py: error: {path}: not a SimpleModel checkpoint: missing keys: conv1.weight, conv1.bias, conv2.weight, "
        "conv2.bias (+6 more); unexpected keys: weight, bias\n")


def test_a_checkpoint_without_weights_says_where_it_looked(tmp_path):
    path = tmp_path / "no_weights.ckpt"
    torch.save({"epoch": 3, "optimizer": {"state": {}, "param_groups": []}}, path)
    with pytest.raises(UserError) as refused:
        models.load_model(path)
    assert str(refused.value) == (f"{path}: found no weights: expected a state_dict (names and tensors), bare or under "
                                  "'model_state_dict', 'state_dict' or 'model', but the file holds a dict with the keys "
                                  "'epoch', 'optimizer'")
