"""SimpleModel / ResNet8 architecture and checkpoint I/O (models.py)."""
import os
import pickle
import shlex

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import models
from cli import UserError
from models import ResNet8, SimpleModel, load_model

# The course's CNN, parameter by parameter: (name, shape).
COURSE_PARAMETERS = {
    "conv1.weight": (16, 3, 5, 5),
    "conv1.bias": (16,),
    "conv2.weight": (16, 16, 5, 5),
    "conv2.bias": (16,),
    "fc1.weight": (120, 400),
    "fc1.bias": (120,),
    "fc2.weight": (84, 120),
    "fc2.bias": (84,),
    "fc3.weight": (3, 84),
    "fc3.bias": (3,),
}


class CourseNet(nn.Module):
    """The network as the course writes it (its checkpoints must load into SimpleModel)."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 5)
        self.pool = nn.MaxPool2d(2, 2)
        self.conv2 = nn.Conv2d(16, 16, 5)
        self.fc1 = nn.Linear(16 * 5 * 5, 120)
        self.fc2 = nn.Linear(120, 84)
        self.fc3 = nn.Linear(84, 3)
        self.dropout = nn.Dropout(0.5)

    def forward(self, x):
        x = self.pool(F.relu(self.conv1(x)))
        x = self.pool(F.relu(self.conv2(x)))
        x = torch.flatten(x, 1)
        x = self.dropout(F.relu(self.fc1(x)))
        x = self.dropout(F.relu(self.fc2(x)))
        return self.fc3(x)


class _RunsShell:
    """Unpickling this runs a shell command: the classic malicious-pickle payload."""

    def __init__(self, command):
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


def images(n=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, 32, 32, generator=g) * 2 - 1


def trained_looking(model, seed=0):
    """Give every parameter and buffer non-default values, so a round trip is a real check."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if t.is_floating_point():
                t.copy_(torch.rand(t.shape, generator=g) * 0.2 + (0.9 if "running_var" in name else -0.1))
    return model


# ---------------------------------------------------------------------------
# Architecture


def test_simple_model_parameters_are_exactly_the_courses():
    state = SimpleModel().state_dict()
    assert {k: tuple(v.shape) for k, v in state.items()} == COURSE_PARAMETERS
    assert list(state) == list(COURSE_PARAMETERS)  # same order as the course's state_dict


def test_simple_model_outputs_one_score_per_class():
    model = SimpleModel().eval()
    for n in (1, 5):
        assert model(images(n)).shape == (n, 3)


def test_simple_model_computes_the_course_forward_pass():
    torch.manual_seed(0)
    course = CourseNet().eval()
    model = SimpleModel().eval()
    model.load_state_dict(course.state_dict())
    x = images(8)
    torch.testing.assert_close(model(x), course(x), rtol=0, atol=0)


def test_dropout_half_after_relu_of_fc1_and_fc2_in_train_mode_only():
    torch.manual_seed(0)
    model = SimpleModel()
    seen = {}
    model.fc1.register_forward_hook(lambda m, i, o: seen.__setitem__("fc1_out", o.detach()))
    model.fc2.register_forward_hook(lambda m, i, o: seen.update(fc2_in=i[0].detach(), fc2_out=o.detach()))
    model.fc3.register_forward_hook(lambda m, i, o: seen.__setitem__("fc3_in", i[0].detach()))
    x = images(64)

    model.train()
    with torch.no_grad():
        model(x)
    for before, after in (("fc1_out", "fc2_in"), ("fc2_out", "fc3_in")):
        relu, fed = F.relu(seen[before]), seen[after]
        kept = fed != 0
        # Kept units are the ReLU outputs scaled by 1 / (1 - 0.5); about half of the live ones are zeroed.
        torch.testing.assert_close(fed[kept], 2 * relu[kept])
        dropped = ((relu > 0) & ~kept).sum() / (relu > 0).sum()
        assert 0.45 < float(dropped) < 0.55, f"{after}: {float(dropped):.2f} of active units dropped"
    with torch.no_grad():
        assert not torch.equal(model(x), model(x)), "train mode should be stochastic"

    model.eval()
    with torch.no_grad():
        first = model(x)
        assert torch.equal(seen["fc2_in"], F.relu(seen["fc1_out"]))
        assert torch.equal(seen["fc3_in"], F.relu(seen["fc2_out"]))
        assert torch.equal(first, model(x))


def test_resnet8_outputs_one_score_per_class():
    assert ResNet8().eval()(images(2)).shape == (2, 3)


# ---------------------------------------------------------------------------
# Saving and loading


def test_save_writes_exactly_the_course_format(tmp_path):
    model = trained_looking(SimpleModel())
    path = tmp_path / "model.ckpt"
    model.save(path)

    ckpt = torch.load(path)
    assert set(ckpt) == {"model_state_dict"}
    # What course code does with a checkpoint:
    course = CourseNet()
    course.load_state_dict(torch.load(path)["model_state_dict"])
    fresh = SimpleModel()
    fresh.load_state_dict(torch.load(path)["model_state_dict"])
    x = images()
    assert torch.equal(course.eval()(x), model.eval()(x))
    assert torch.equal(fresh.eval()(x), model(x))


def test_save_gives_the_file_normal_permissions(tmp_path):
    path = tmp_path / "model.ckpt"
    SimpleModel().save(path)
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask


def test_load_reads_a_course_checkpoint(tmp_path):
    torch.manual_seed(1)
    course = CourseNet()
    path = tmp_path / "course.ckpt"
    torch.save({"model_state_dict": course.state_dict()}, path)

    model = SimpleModel.load(path)
    assert type(model) is SimpleModel
    assert not model.training, "a loaded model is ready for evaluation"
    x = images()
    assert torch.equal(model(x), course.eval()(x))
    assert type(load_model(path)) is SimpleModel


def test_load_reads_a_bare_state_dict(tmp_path):
    original = trained_looking(SimpleModel()).eval()
    path = tmp_path / "bare.pt"
    torch.save(original.state_dict(), path)
    model = SimpleModel.load(path)
    x = images()
    assert torch.equal(model(x), original(x))


@pytest.mark.parametrize("wrap, key_prefix, prefixes", [
    (lambda m: nn.DataParallel(torch.compile(m)), "module._orig_mod.", "module. and _orig_mod. prefixes"),
    (lambda m: torch.compile(nn.DataParallel(m)), "_orig_mod.module.", "_orig_mod. and module. prefixes"),
], ids=["DataParallel of a compiled model", "compiled DataParallel"])
def test_a_state_dict_under_two_stacked_wrappers_loads(wrap, key_prefix, prefixes, tmp_path, capsys):
    # The wrappers themselves write the keys: 'module._orig_mod.conv1.weight' and the like.
    for original in (trained_looking(SimpleModel()).eval(), trained_looking(ResNet8()).eval()):
        path = tmp_path / f"{original.arch}.pt"
        wrapped = wrap(original).state_dict()
        assert all(k.startswith(key_prefix) for k in wrapped)
        torch.save(wrapped, path)
        capsys.readouterr()
        loaded = load_model(path)  # the architecture guessed from the stripped keys
        assert type(loaded) is type(original)
        assert loaded.state_dict().keys() == original.state_dict().keys()
        assert all(torch.equal(v, original.state_dict()[k]) for k, v in loaded.state_dict().items())
        note = f"note: {path}: read the weights from a bare state_dict ({prefixes} stripped)\n"
        assert capsys.readouterr().err == note


def test_resnet8_round_trip_keeps_arch_and_outputs(tmp_path):
    original = trained_looking(ResNet8()).eval()
    path = tmp_path / "resnet.ckpt"
    original.save(path)

    ckpt = torch.load(path)
    assert ckpt["arch"] == "resnet8"
    assert set(ckpt) == {"model_state_dict", "arch"}
    loaded = load_model(path)
    assert type(loaded) is ResNet8
    assert not loaded.training
    x = images(3)
    assert torch.equal(loaded(x), original(x))
    for name, value in original.state_dict().items():  # batch-norm statistics included
        assert torch.equal(loaded.state_dict()[name], value), name


def test_simple_model_load_refuses_a_resnet8_checkpoint(tmp_path):
    path = tmp_path / "resnet.ckpt"
    ResNet8().save(path)
    assert one_line_error(path) == (f"{path}: holds a 'resnet8' model, not a SimpleModel ('simple'); "
                                    "models.load_model(path) builds the model a checkpoint names")


def test_bare_resnet8_state_dict_loads_as_resnet8(tmp_path):
    original = trained_looking(ResNet8()).eval()
    path = tmp_path / "bare.pt"
    torch.save(original.state_dict(), path)
    loaded = load_model(path)
    assert type(loaded) is ResNet8
    assert torch.equal(loaded(images(2)), original(images(2)))


def one_line_error(path, loader=SimpleModel.load):
    with pytest.raises(UserError) as info:
        loader(path)
    message = str(info.value)
    assert "\n" not in message, message
    assert str(path) in message
    return message


def test_other_architecture_names_missing_and_unexpected_keys(tmp_path):
    path = tmp_path / "linear.pt"
    torch.save(nn.Linear(4, 2).state_dict(), path)
    assert one_line_error(path) == (f"{path}: not a SimpleModel checkpoint: missing keys: conv1.weight, conv1.bias, "
                                    "conv2.weight, conv2.bias (+6 more); unexpected keys: weight, bias")


def test_other_architecture_in_course_format_is_refused(tmp_path):
    path = tmp_path / "linear.ckpt"
    torch.save({"model_state_dict": nn.Linear(4, 2).state_dict()}, path)
    assert one_line_error(path) == (f"{path}: not a SimpleModel checkpoint: missing keys: conv1.weight, conv1.bias, "
                                    "conv2.weight, conv2.bias (+6 more); unexpected keys: weight, bias")


def test_ten_class_simple_model_names_mis_shaped_keys(tmp_path):
    path = tmp_path / "cifar10.ckpt"
    torch.save({"model_state_dict": SimpleModel(num_classes=10).state_dict()}, path)
    # Only the keys that differ are named.
    assert one_line_error(path) == (f"{path}: not a SimpleModel checkpoint: mis-shaped: fc3.weight [10, 84] != "
                                    "[3, 84], fc3.bias [10] != [3]")


def test_arch_tag_with_wrong_weights_is_refused(tmp_path):
    path = tmp_path / "lying.ckpt"
    torch.save({"model_state_dict": SimpleModel().state_dict(), "arch": "resnet8"}, path)
    assert one_line_error(path, load_model) == (
        f"{path}: not a ResNet8 checkpoint: missing keys: prep.0.weight, prep.1.weight, prep.1.bias, "
        "prep.1.running_mean (+46 more); unexpected keys: conv1.weight, conv1.bias, conv2.weight, conv2.bias (+6 more)")


def test_unknown_arch_is_refused(tmp_path):
    path = tmp_path / "future.ckpt"
    torch.save({"model_state_dict": SimpleModel().state_dict(), "arch": "vit"}, path)
    assert one_line_error(path, load_model) == f"{path}: unknown architecture 'vit' (known: simple, resnet8, whitened)"


@pytest.mark.parametrize(
    "content, expected",
    [
        (b"", "empty file (0 bytes), not a PyTorch checkpoint"),
        (b"this is a text file, not a checkpoint\n",
         "not a PyTorch checkpoint: it holds text, starting 'this is a text file, not a checkpoint\\n'"),
        (bytes(range(256)) * 8, "not a PyTorch checkpoint"),
    ],
    ids=["empty", "text", "garbage"],
)
def test_corrupt_file_is_refused(tmp_path, content, expected):
    path = tmp_path / "model.ckpt"
    path.write_bytes(content)
    assert one_line_error(path) == f"{path}: {expected}"


def test_truncated_checkpoint_is_refused(tmp_path):
    path = tmp_path / "model.ckpt"
    SimpleModel().save(path)
    data = path.read_bytes()
    for cut in (len(data) // 10, len(data) // 2, len(data) - 100):
        path.write_bytes(data[:cut])
        assert one_line_error(path) == (f"{path}: truncated checkpoint: it starts as the zip archive torch.save "
                                        "writes, but the archive's end is missing; copy or save it again")


NO_WEIGHTS = ("found no weights: expected a state_dict (names and tensors), bare or under 'model_state_dict', "
              "'state_dict' or 'model', but the file holds ")


@pytest.mark.parametrize(
    "obj, expected",
    [([1, 2, 3], NO_WEIGHTS + "a list of 3 items"), ({"epoch": 3}, NO_WEIGHTS + "a dict with the keys 'epoch'"),
     ({"model_state_dict": [1, 2]}, "'model_state_dict' holds a list of 2 items, not a state_dict (names and tensors)"),
     (torch.zeros(3), NO_WEIGHTS + "a torch.float32 tensor of shape [3]")],
    ids=["list", "dict-without-weights", "state-not-a-dict", "tensor"],
)
def test_non_checkpoint_file_is_refused(tmp_path, obj, expected):
    path = tmp_path / "model.ckpt"
    torch.save(obj, path)
    assert one_line_error(path) == f"{path}: {expected}"


def test_missing_file_and_folder_are_refused(tmp_path):
    assert one_line_error(tmp_path / "nope.ckpt") == f"{tmp_path / 'nope.ckpt'}: no such checkpoint file"
    assert one_line_error(tmp_path) == f"{tmp_path}: is a folder, expected a checkpoint file"


@pytest.mark.parametrize("fmt", ["torch.save", "raw pickle"])
def test_malicious_checkpoint_never_runs_its_payload(tmp_path, fmt):
    marker = tmp_path / "PWNED"
    payload = _RunsShell(f"touch {shlex.quote(str(marker))}")
    path = tmp_path / "evil.ckpt"
    ckpt = {"model_state_dict": SimpleModel().state_dict(), "extra": payload}
    if fmt == "torch.save":
        torch.save(ckpt, path)
        expected = "refused: it refers to posix.system, which a checkpoint never holds (loading it could run code)"
    else:  # refused before any of it is read: not torch's format
        path.write_bytes(pickle.dumps(ckpt, protocol=2))
        expected = ("not a PyTorch checkpoint: a pickle, but not in torch.save's format (save the weights with "
                    "torch.save(model.state_dict(), path))")
    assert one_line_error(path, load_model) == f"{path}: {expected}"
    assert not marker.exists(), "loading the checkpoint ran code from it"
    # Sanity check of the payload itself: unrestricted unpickling would have run it.
    pickle.loads(pickle.dumps(payload))
    assert marker.exists()


def test_save_is_atomic(tmp_path, monkeypatch):
    path = tmp_path / "model.ckpt"
    old = trained_looking(SimpleModel(), seed=1).eval()
    old.save(path)
    before = path.read_bytes()

    def write_half_then_fail(obj, f, *args, **kwargs):
        f.write(b"PK\x03\x04 half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(models.torch, "save", write_half_then_fail)
    with pytest.raises(UserError) as info:
        trained_looking(SimpleModel(), seed=2).save(path)
    assert str(info.value) == f"{path}: cannot write (disk full); the previous file is unchanged"
    monkeypatch.undo()

    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.ckpt"], "temporary file left behind"
    assert torch.equal(SimpleModel.load(path)(images()), old(images()))


def test_save_creates_missing_folders_and_overwrites(tmp_path):
    path = tmp_path / "runs" / "a" / "model.ckpt"
    SimpleModel().save(path)
    second = trained_looking(SimpleModel(), seed=3).eval()
    second.save(path)
    assert torch.equal(SimpleModel.load(path)(images()), second(images()))
    assert sorted(p.name for p in path.parent.iterdir()) == ["model.ckpt"]
