"""Course data pickles (safe loading, validation) and building them from CIFAR-10 (dataset.py)."""
import builtins
import hashlib
import io
import json
import os
import pickle
import shlex
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import dataset
from conftest import assert_one_error_line, cifar_dir, needs_cifar, run_script
from cli import UserError
from dataset import build_from_cifar, class_counts, load_pickle, save_pickle
from images import from_unit

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def random_images(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, 32, 32, generator=g) * 2 - 1


def good_items(n=5, seed=0):
    return [(image, i % 3) for i, image in enumerate(random_images(n, seed))]


def dump(path, obj, protocol=pickle.DEFAULT_PROTOCOL):
    """Write obj the way course code does: a plain pickle.dump."""
    with open(path, "wb") as f:
        pickle.dump(obj, f, protocol=protocol)
    return path


class _RunsShell:
    """Unpickling this runs a shell command: the classic malicious-pickle payload."""

    def __init__(self, command):
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


class _OpensForWriting:
    """Unpickling this creates a file (builtins.open in write mode)."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (builtins.open, (self.path, "w"))


class _StorageFromBytes:
    """Pickles as torch.storage._load_from_bytes(data): how torch pickles a tensor's storage."""

    def __init__(self, data):
        self.data = data

    def __reduce__(self):
        return (torch.storage._load_from_bytes, (self.data,))


# ---------------------------------------------------------------------------
# Reading and writing course pickles


def test_save_load_round_trip(tmp_path):
    images = random_images(20)
    labels = torch.tensor([0, 1, 2, 2, 0] * 4)
    path = tmp_path / "set.pickle"
    save_pickle(path, images, labels)

    loaded_images, loaded_labels = load_pickle(path)
    assert isinstance(loaded_images, torch.Tensor) and isinstance(loaded_labels, torch.Tensor)
    assert loaded_images.shape == (20, 3, 32, 32) and loaded_images.dtype == torch.float32
    assert loaded_labels.shape == (20,) and loaded_labels.dtype == torch.int64
    assert torch.equal(loaded_images, images)
    assert torch.equal(loaded_labels, labels)


def test_saved_file_is_the_course_format(tmp_path):
    images, labels = random_images(6), torch.tensor([2, 1, 0, 0, 1, 2])
    path = tmp_path / "set.pickle"
    save_pickle(path, images, labels)

    with open(path, "rb") as f:  # what course code does
        items = pickle.load(f)
    assert type(items) is list and len(items) == 6
    for (image, label), want_image, want_label in zip(items, images, labels):
        assert type(label) is int and label == int(want_label)
        assert isinstance(image, torch.Tensor) and image.dtype == torch.float32
        assert torch.equal(image, want_image)


def test_saved_file_holds_each_image_once(tmp_path):
    # Pickling views of one big tensor would store the whole tensor with every image.
    n = 30
    path = tmp_path / "set.pickle"
    save_pickle(path, random_images(n), torch.zeros(n, dtype=torch.long))
    assert path.stat().st_size < 1.1 * n * 3 * 32 * 32 * 4


@pytest.mark.parametrize("protocol", [3, 4, 5])
def test_course_written_pickle_loads_unchanged(tmp_path, protocol):
    from torchvision import transforms

    to_course = transforms.Compose([transforms.ToTensor(), transforms.Normalize((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))])
    rng = np.random.default_rng(protocol)
    items = [(to_course(Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8))), i % 3) for i in range(7)]
    path = dump(tmp_path / "course.pickle", items, protocol)

    images, labels = load_pickle(path)
    assert torch.equal(images, torch.stack([image for image, _ in items]))
    assert labels.tolist() == [label for _, label in items]
    assert images.min() >= -1 and images.max() <= 1


def test_values_just_outside_the_range_are_tolerated(tmp_path):
    items = good_items(3)
    items[1][0][0, 0, 0] = 1.0005
    items[1][0][0, 0, 1] = -1.0005
    images, _ = load_pickle(dump(tmp_path / "rounding.pickle", items))
    assert -1 <= float(images.min()) and float(images.max()) <= 1


@pytest.mark.parametrize("value", [1.0011, -1.0011, 1.01, -1.01, 1.5])
def test_values_past_the_tolerance_are_refused_naming_the_item(tmp_path, value):
    # docs/data.md: values at most 0.001 outside [-1, 1] are float rounding, clamped; further out (a
    # pixel level is 2/255 = 0.0078) they were not normalized as (x - 0.5) / 0.5, and are refused.
    items = [(torch.zeros(3, 32, 32), 0) for _ in range(3)]
    items[2][0][1, 5, 7] = value
    path = dump(tmp_path / "off.pickle", items)
    low, high = (0.0, value) if value > 0 else (value, 0.0)
    with pytest.raises(UserError) as info:
        load_pickle(path)
    assert str(info.value) == (f"{path}: item 2: pixel values span [{low:.3f}, {high:.3f}], expected [-1, 1] "
                               "(images must be normalized as (x - 0.5) / 0.5)")
    items[2][0][1, 5, 7] = 1.0009 if value > 0 else -1.0009  # within the tolerance: clamped to the end
    images, _ = load_pickle(dump(tmp_path / "rounding.pickle", items))
    assert float(images[2, 1, 5, 7]) == (1.0 if value > 0 else -1.0)


def test_un_normalize_image_inverts_the_courses_normalization_per_channel():
    # The course normalizes with torchvision's Normalize((0.5,) * 3, (0.5,) * 3) after ToTensor; un_normalize_image
    # gives back ToTensor's [0, 1] pixels, channel by channel, as H x W x 3 (not square: height stays height).
    from torchvision import transforms

    pixels = np.random.default_rng(0).integers(0, 256, (20, 30, 3), dtype=np.uint8)
    pixels[..., 0] = 255 - pixels[..., 1]  # channels that differ
    normalized = transforms.Compose([transforms.ToTensor(), transforms.Normalize((0.5,) * 3, (0.5,) * 3)])(
        Image.fromarray(pixels))
    back = dataset.un_normalize_image(normalized)
    assert back.shape == (20, 30, 3)
    assert np.allclose(back, pixels / 255, atol=1e-6)
    assert np.allclose(dataset.un_normalize_image(normalized.numpy()), pixels / 255, atol=1e-6)


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_big_endian_numpy_arrays_in_a_data_pickle_load_with_their_values(tmp_path, protocol):
    # numpy keeps an array's byte order in its pickle: a big-endian float32 image ('>f4') and a big-endian
    # int64 label must come out as the numbers numpy itself reads back, not as byte-swapped ones.
    image = (np.random.default_rng(protocol).random((3, 32, 32)) * 2 - 1).astype(">f4")
    items = [(image, np.array([2], dtype=">i8")[0]), (image.astype("<f4"), np.int64(1)),
             (image.astype(">f8"), 0)]
    path = dump(tmp_path / "big_endian.pickle", items, protocol)
    with open(path, "rb") as f:
        expected = pickle.load(f)  # numpy's own reading (the file is our own: safe to unpickle here)
    images, labels = load_pickle(path)
    for got, (array, _) in zip(images, expected):
        assert torch.equal(got, torch.from_numpy(array.astype("=f4")))
    assert labels.tolist() == [2, 1, 0]


class _ViewOfStorage:
    """Pickles as torch's tensor rebuilder over `storage`: an image [3, 32, 32] starting at element `offset`."""

    def __init__(self, storage, offset):
        self.storage, self.offset = storage, offset

    def __reduce__(self):
        import collections

        return (torch._utils._rebuild_tensor_v2,
                (self.storage, self.offset, (3, 32, 32), (1024, 32, 1), False, collections.OrderedDict()))


def test_a_tensor_may_reach_its_storages_last_element_and_not_one_past_it(tmp_path):
    import warnings

    base = torch.arange(3072.0) / 3072
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TypedStorage is deprecated; torch still pickles tensors through it
        storage = base.storage()
    # Offset 0: the image's last element is the storage's last, element 3071 of 3072.
    images, _ = load_pickle(dump(tmp_path / "fits.pickle", [(_ViewOfStorage(storage, 0), 0)]))
    assert torch.equal(images[0], base.view(3, 32, 32))
    # Offset 1: it would read element 3072, one past the end.
    path = dump(tmp_path / "past.pickle", [(_ViewOfStorage(storage, 1), 0)])
    with pytest.raises(UserError) as info:
        load_pickle(path)
    assert str(info.value) == f"{path}: refused: a tensor of size [3, 32, 32] reaches element 3,072 of a storage of " \
                              "3,072 elements"


@pytest.mark.parametrize("payload", ["os.system", "open for writing"])
def test_malicious_pickle_is_refused_and_never_runs(tmp_path, payload):
    marker = tmp_path / "MARKER"
    evil = _RunsShell(f"touch {shlex.quote(str(marker))}") if payload == "os.system" else _OpensForWriting(marker)
    path = dump(tmp_path / "evil.pickle", good_items(2) + [(evil, 0)])

    with pytest.raises(UserError, match="evil.pickle") as info:
        load_pickle(path)
    assert "\n" not in str(info.value)
    assert not marker.exists(), "loading the pickle ran code from it"
    # The payload is live: an ordinary unpickler would have run it.
    with open(path, "rb") as f:
        pickle.load(f)
    assert marker.exists()


@pytest.mark.parametrize("zip_format", [False, True], ids=["legacy", "zip"])
def test_malicious_payload_inside_tensor_storage_bytes_never_runs(tmp_path, zip_format):
    # torch pickles tensor storages as torch.storage._load_from_bytes(bytes), which the loader
    # must allow; the bytes themselves can hold a pickle with a payload.
    marker = tmp_path / "MARKER"
    inner = io.BytesIO()
    torch.save(_RunsShell(f"touch {shlex.quote(str(marker))}"), inner, _use_new_zipfile_serialization=zip_format)
    path = dump(tmp_path / "sneaky.pickle", [(_StorageFromBytes(inner.getvalue()), 0)])

    with pytest.raises(UserError):
        load_pickle(path)
    assert not marker.exists(), "loading the pickle ran code from it"
    torch.storage._load_from_bytes(inner.getvalue())  # unrestricted loading would have run it
    assert marker.exists()


def _image(fill=None, shape=(3, 32, 32), dtype=torch.float32):
    image = torch.zeros(shape, dtype=dtype)
    if fill is not None:
        image[1, 2, 3] = fill
    return image


BAD_ITEMS = {
    "wrong shape": ((_image(shape=(3, 28, 28)), 0), "shape [3, 28, 28]"),
    "channels last": ((_image(shape=(32, 32, 3)), 0), "shape [32, 32, 3]"),
    "a batch of two": ((_image(shape=(2, 3, 32, 32)), 0), "shape"),  # a batch of one is a course image
    "integer dtype": ((_image(dtype=torch.uint8), 0), "dtype torch.uint8"),
    "NaN": ((_image(float("nan")), 0), "NaN"),
    "infinity": ((_image(float("inf")), 1), "infinite"),
    "above 1": ((_image(1.5), 0), "[-1, 1]"),
    "below -1": ((_image(-1.2), 2), "[-1, 1]"),
    "not normalized (0-255)": ((torch.full((3, 32, 32), 200.0), 0), "[-1, 1]"),
    "label 3": ((_image(), 3), "label 3"),
    "label -1": ((_image(), -1), "label -1"),
    "label float": ((_image(), 1.0), "label 1.0"),
    "label str": ((_image(), "car"), "label 'car'"),
    "image a list": ((_image().tolist(), 0), "image is a list"),
    "not a pair": ((_image(),), "not an (image, label) pair"),
}


@pytest.mark.parametrize("case", list(BAD_ITEMS))
def test_bad_item_is_refused_naming_its_index(tmp_path, case):
    bad, reason = BAD_ITEMS[case]
    items = good_items(5)
    items[2] = bad
    path = dump(tmp_path / "bad.pickle", items)
    with pytest.raises(UserError) as info:
        load_pickle(path)
    message = str(info.value)
    assert "\n" not in message
    assert str(path) in message
    assert "item 2" in message, message
    assert reason in message, message


@pytest.mark.parametrize(
    "obj, reason",
    [([], "empty"), ({"images": 1}, "found dict"), (torch.zeros(4, 3, 32, 32), "found Tensor"), (7, "found int")],
    ids=["empty list", "dict", "tensor", "int"],
)
def test_not_a_list_of_items_is_refused(tmp_path, obj, reason):
    path = dump(tmp_path / "odd.pickle", obj)
    with pytest.raises(UserError, match=reason):
        load_pickle(path)


def test_truncated_file_is_refused(tmp_path):
    path = tmp_path / "set.pickle"
    save_pickle(path, random_images(4), torch.tensor([0, 1, 2, 0]))
    data = path.read_bytes()
    for cut in (0, 1, 40, len(data) // 3, len(data) // 2, len(data) - 1):
        path.write_bytes(data[:cut])
        with pytest.raises(UserError, match="set.pickle"):
            load_pickle(path)


@pytest.mark.parametrize("content", [b"car,truck,cat\n1,2,3\n", bytes(range(256)) * 4], ids=["text", "garbage"])
def test_file_that_is_not_a_pickle_is_refused(tmp_path, content):
    path = tmp_path / "set.pickle"
    path.write_bytes(content)
    with pytest.raises(UserError, match="set.pickle"):
        load_pickle(path)


def test_model_checkpoint_passed_as_data_is_refused(tmp_path):
    path = tmp_path / "model.ckpt"
    torch.save({"model_state_dict": {"w": torch.zeros(2)}}, path)
    with pytest.raises(UserError, match="model.ckpt"):
        load_pickle(path)


def test_missing_file_is_refused(tmp_path):
    with pytest.raises(UserError, match="nope.pickle.*dataset.py build"):
        load_pickle(tmp_path / "nope.pickle")
    with pytest.raises(UserError):
        load_pickle(tmp_path)  # a folder


# ---------------------------------------------------------------------------
# Building from a local CIFAR-10 copy (a tiny ImageFolder tree made here)

TREE_SIZES = {"automobile": 10, "truck": 6, "cat": 10}
SMALL = dict(train_counts=(4, 2, 6), dev_counts=(3, 2, 3), mislabeled=3)


def write_tree(root, sizes=TREE_SIZES, seed=0):
    """train/<cifar class>/NNNN.png|jpg of random 32x32 photos; returns {(class, name): course tensor}."""
    rng = np.random.default_rng(seed)
    reference = {}
    for cls, (name, n) in enumerate(sizes.items()):
        folder = root / "train" / name
        folder.mkdir(parents=True)
        (folder / "notes.txt").write_text("not an image\n")
        for j in range(n):
            path = folder / f"{j:04d}.{'jpg' if j % 3 == 2 else 'png'}"
            Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(path, quality=95, subsampling=0)
            decoded = torch.from_numpy(np.asarray(Image.open(path).convert("RGB")).copy()).permute(2, 0, 1)
            reference[(cls, path.name)] = from_unit(decoded.float() / 255)
    return reference


@pytest.fixture(scope="module")
def tiny_cifar(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny_cifar")
    return root, write_tree(root)


def identify(images, reference):
    """The (true class, file name) of each built image, by nearest source photo."""
    keys = list(reference)
    refs = torch.stack([reference[k] for k in keys])
    distance = (images[:, None] - refs[None]).abs().flatten(2).mean(2)
    best = distance.min(1)
    assert (best.values < 0.05).all(), "a built image matches none of the source photos"
    return [keys[i] for i in best.indices.tolist()]


def build_small(root, out, seed=0, **overrides):
    return build_from_cifar(root, out, seed=seed, quiet=True, **{**SMALL, **overrides})


def test_build_from_image_tree(tiny_cifar, tmp_path):
    root, reference = tiny_cifar
    out = tmp_path / "data"
    manifest = build_small(root, out)

    assert json.loads((out / "manifest.json").read_text()) == manifest
    assert manifest["seed"] == 0 and manifest["source"] == str(root)
    assert manifest["train"] == {
        "true_counts": {"car": 4, "truck": 2, "cat": 6},
        "given_counts": {"car": 7, "truck": 2, "cat": 3},
    }
    assert manifest["dev"] == {
        "true_counts": {"car": 3, "truck": 2, "cat": 3},
        "given_counts": {"car": 3, "truck": 2, "cat": 3},
    }

    train_x, train_y = load_pickle(out / "train.pickle")
    dev_x, dev_y = load_pickle(out / "dev.pickle")
    assert class_counts(train_y) == [7, 2, 3] and class_counts(dev_y) == [3, 2, 3]

    train_ids, dev_ids = identify(train_x, reference), identify(dev_x, reference)
    assert len(set(train_ids)) == 12 and len(set(dev_ids)) == 8, "an image was used twice"
    assert not set(train_ids) & set(dev_ids), "train and dev share images"

    dev_true = torch.tensor([cls for cls, _ in dev_ids])
    assert torch.equal(dev_y, dev_true), "dev labels must all be correct"

    train_true = torch.tensor([cls for cls, _ in train_ids])
    assert class_counts(train_true) == [4, 2, 6]
    wrong = (train_y != train_true).nonzero().flatten().tolist()
    listed = [entry["index"] for entry in manifest["mislabeled"]]
    assert sorted(listed) == wrong and len(wrong) == 3
    for entry in manifest["mislabeled"]:
        i = entry["index"]
        assert (entry["given"], entry["true"]) == ("car", "cat")
        assert int(train_y[i]) == 0 and int(train_true[i]) == 2
        assert entry["source"] == train_ids[i][1]


def test_build_also_accepts_the_train_folder_itself(tiny_cifar, tmp_path):
    root, reference = tiny_cifar
    build_small(root / "train", tmp_path / "data")
    images, _ = load_pickle(tmp_path / "data" / "train.pickle")
    identify(images, reference)


def test_build_is_deterministic_by_seed(tiny_cifar, tmp_path):
    root, reference = tiny_cifar
    for name, seed in (("a", 5), ("b", 5), ("c", 6)):
        build_small(root, tmp_path / name, seed=seed)

    def contents(name):
        return [load_pickle(tmp_path / name / f"{split}.pickle") for split in ("train", "dev")]

    a, b, c = contents("a"), contents("b"), contents("c")
    for (xa, ya), (xb, yb) in zip(a, b):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    assert (tmp_path / "a" / "manifest.json").read_bytes() == (tmp_path / "b" / "manifest.json").read_bytes()

    chosen_a = set(identify(a[0][0], reference))
    chosen_c = set(identify(c[0][0], reference))
    assert chosen_a != chosen_c, "a different seed should pick different images"


def test_build_refuses_more_images_than_the_source_holds(tiny_cifar, tmp_path):
    root, _ = tiny_cifar
    out = tmp_path / "data"
    with pytest.raises(UserError, match="holds only 10"):
        build_small(root, out, train_counts=(8, 2, 6), dev_counts=(3, 2, 3))
    with pytest.raises(UserError, match="holds only 6"):
        build_small(root, out, train_counts=(4, 5, 6), dev_counts=(3, 2, 3))
    assert not (out / "train.pickle").exists()


def test_build_refuses_more_mislabeled_than_training_cats(tiny_cifar, tmp_path):
    root, _ = tiny_cifar
    with pytest.raises(UserError, match="mislabeled"):
        build_small(root, tmp_path / "data", mislabeled=7)


def test_build_refuses_a_folder_that_is_not_a_cifar_copy(tmp_path):
    (tmp_path / "photos" / "train" / "dog").mkdir(parents=True)
    (tmp_path / "photos" / "train" / "automobile").mkdir()
    with pytest.raises(UserError, match="not a CIFAR-10 copy"):
        build_small(tmp_path / "photos", tmp_path / "data")
    with pytest.raises(UserError, match="not found"):
        build_small(tmp_path / "missing", tmp_path / "data")


def test_build_refuses_corrupt_cifar_batches(tmp_path):
    batches = tmp_path / "cifar" / "cifar-10-batches-py"
    batches.mkdir(parents=True)
    (batches / "data_batch_1").write_bytes(b"not a CIFAR batch")
    with pytest.raises(UserError, match="cifar-10-batches-py"):
        build_small(tmp_path / "cifar", tmp_path / "data")


class Py2Pickler(pickle._Pickler):
    """Pickles bytes as Python 2's str (SHORT_BINSTRING / BINSTRING), as CIFAR-10's batches were written."""

    dispatch = pickle._Pickler.dispatch.copy()

    def save_py2_str(self, obj):
        header = pickle.SHORT_BINSTRING + bytes([len(obj)]) if len(obj) < 256 else \
            pickle.BINSTRING + len(obj).to_bytes(4, "little")
        self.write(header + obj)
        self.memoize(obj)

    dispatch[bytes] = save_py2_str


def write_batches(folder, pixels, labels, per_batch):
    """data_batch_1..5 in CIFAR-10's python format: {b'data': uint8 [N, 3072], b'labels': [...], ...}."""
    folder.mkdir(parents=True, exist_ok=True)
    for k in range(5):
        chunk = slice(k * per_batch, (k + 1) * per_batch)
        batch = {b"batch_label": f"training batch {k + 1} of 5".encode(), b"labels": labels[chunk],
                 b"data": pixels[chunk].reshape(-1, 3072), b"filenames": [b"x.png"] * len(labels[chunk])}
        out = io.BytesIO()
        Py2Pickler(out, protocol=2).dump(batch)
        # numpy 1, which wrote the real files, names its reconstructor numpy.core.multiarray.
        data = out.getvalue().replace(b"cnumpy._core.multiarray\n", b"cnumpy.core.multiarray\n")
        (folder / f"data_batch_{k + 1}").write_bytes(data)


# CIFAR-10's class list, as its documentation (and batches.meta's label_names) gives it: a label is its position.
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")


def test_the_cifar_batches_give_cars_trucks_and_cats_by_cifar_10s_own_label_ids(tmp_path):
    # Every CIFAR-10 class in the batches, each a solid grey of its own (label id x 20 + 5): the built
    # car, truck and cat images must be those of automobile (1), truck (9) and cat (3).
    assert dataset.CIFAR_IDS == tuple(CIFAR10_CLASSES.index(name) for name in dataset.CIFAR_NAMES)
    labels = [k % 10 for k in range(100)]
    pixels = np.stack([np.full((3, 32, 32), 20 * label + 5, dtype=np.uint8) for label in labels])
    write_batches(tmp_path / "cifar-10-batches-py", pixels, labels, per_batch=20)
    build_small(tmp_path, tmp_path / "data", train_counts=(4, 4, 4), dev_counts=(3, 3, 3), mislabeled=0)
    for split in ("train", "dev"):
        images, given = load_pickle(tmp_path / "data" / f"{split}.pickle")
        for course_label, name in enumerate(dataset.CLASSES):
            cifar_name = "automobile" if name == "car" else name
            grey = from_unit(torch.tensor((20 * CIFAR10_CLASSES.index(cifar_name) + 5) / 255))
            assert torch.allclose(images[given == course_label], grey.expand(int((given == course_label).sum()),
                                                                            3, 32, 32)), (split, name)


@needs_cifar
def test_real_cifar_batches_give_the_same_data_as_the_image_tree(tmp_path):
    # The same 30 real photos per class, once as an image tree and once as python batches.
    tree, pixels, labels = tmp_path / "tree" / "train", [], []
    for name, cifar_id in zip(dataset.CIFAR_NAMES, dataset.CIFAR_IDS):
        (tree / name).mkdir(parents=True)
        for path in sorted((cifar_dir() / "train" / name).iterdir())[:30]:
            (tree / name / path.name).symlink_to(path)
            pixels.append(np.asarray(Image.open(path).convert("RGB")).transpose(2, 0, 1))
            labels.append(cifar_id)
    write_batches(tmp_path / "batches" / "cifar-10-batches-py", np.stack(pixels), labels, per_batch=18)
    counts = dict(train_counts=(10, 8, 12), dev_counts=(5, 5, 5), mislabeled=4)
    from_tree = build_small(tmp_path / "tree", tmp_path / "a", **counts)
    from_batches = build_small(tmp_path / "batches", tmp_path / "b", **counts)
    for split in ("train", "dev"):
        a, b = load_pickle(tmp_path / "a" / f"{split}.pickle"), load_pickle(tmp_path / "b" / f"{split}.pickle")
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert from_tree["mislabeled"] != [] and len(from_batches["mislabeled"]) == 4


class Call:
    def __init__(self, func, *args):
        self.func, self.args = func, args

    def __reduce__(self):
        return (self.func, self.args)


def batch_folder(tmp_path, batch_1):
    """A batches folder whose data_batch_1 holds batch_1 (bytes) and the others a valid tiny batch."""
    folder = tmp_path / "cifar-10-batches-py"
    write_batches(folder, np.zeros((5, 3, 32, 32), np.uint8), [1, 9, 3, 1, 9], per_batch=1)
    (folder / "data_batch_1").write_bytes(batch_1)
    return tmp_path


@pytest.mark.parametrize("case, words", [
    ("payload", "refers to posix.system"),
    ("object array", "dtype 'O8'"),
    ("array claiming more than its bytes", "holds 12 bytes, not"),
    ("labels out of range", "ints from 0 to 9"),
    ("not a dict", "not a CIFAR-10 batch"),
])
def test_cifar_batches_are_read_without_running_code(tmp_path, case, words):
    marker = tmp_path / "MARKER"
    if case == "payload":
        batch = pickle.dumps({b"data": Call(os.system, f"touch {marker}"), b"labels": []}, protocol=2)
    elif case == "object array":
        batch = pickle.dumps({b"data": np.array([None, 1], dtype=object), b"labels": [1, 1]}, protocol=2)
    elif case == "array claiming more than its bytes":
        batch = pickle.dumps({b"data": np.zeros((4, 3), np.uint8), b"labels": [1] * 4}, protocol=2)
        batch = batch.replace(b"K\x04K\x03\x86", b"J\x00\x00\x00\x40K\x03\x86")  # shape (2**30, 3)
    elif case == "labels out of range":
        batch = pickle.dumps({b"data": np.zeros((2, 3072), np.uint8), b"labels": [1, 10]}, protocol=2)
    else:
        batch = pickle.dumps([1, 2, 3], protocol=2)
    with pytest.raises(UserError) as info:
        build_small(batch_folder(tmp_path, batch), tmp_path / "data")
    assert words in str(info.value) and "data_batch_1" in str(info.value), str(info.value)
    assert not marker.exists()


def test_build_refuses_bad_image_files(tmp_path):
    write_tree(tmp_path / "empty", {"automobile": 8, "truck": 5, "cat": 0})
    with pytest.raises(UserError, match="cat: no .jpg or .png"):
        build_small(tmp_path / "empty", tmp_path / "data")

    write_tree(tmp_path / "big", {"automobile": 0, "truck": 5, "cat": 10})
    car = tmp_path / "big" / "train" / "automobile"
    for j in range(8):
        Image.new("RGB", (64, 48)).save(car / f"{j}.png")
    with pytest.raises(UserError, match="64x48, expected CIFAR's 32x32"):
        build_small(tmp_path / "big", tmp_path / "data")

    write_tree(tmp_path / "broken", {"automobile": 8, "truck": 4, "cat": 10})  # every truck is used
    (tmp_path / "broken" / "train" / "truck" / "0000.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    with pytest.raises(UserError, match="0000.png: cannot decode"):
        build_small(tmp_path / "broken", tmp_path / "data")


def test_build_offline_without_a_source_says_to_pass_a_local_copy(tmp_path, monkeypatch):
    import urllib.error

    import torchvision.datasets.utils

    def no_network(*args, **kwargs):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(torchvision.datasets.utils, "download_and_extract_archive", no_network)
    with pytest.raises(UserError) as info:
        build_from_cifar(None, tmp_path / "data", quiet=True)
    message = str(info.value)
    assert "\n" not in message
    assert "--cifar-dir" in message and "CIFAR10_DIR" in message


# ---------------------------------------------------------------------------
# ensure_data: scripts that need data build the default set, never a custom path


@pytest.fixture
def build_calls(monkeypatch, tmp_path):
    calls = []
    monkeypatch.setattr(dataset, "build_from_cifar", lambda *args, **kwargs: calls.append((args, kwargs)))
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("CIFAR10_DIR", raising=False)
    return calls


def test_ensure_data_refuses_a_missing_custom_path(build_calls, tmp_path):
    with pytest.raises(UserError, match="my_train.pickle"):
        dataset.ensure_data(tmp_path / "my_train.pickle", dataset.DEV_PATH)
    assert build_calls == []


def test_ensure_data_leaves_existing_data_alone(build_calls, tmp_path):
    for path in (dataset.TRAIN_PATH, dataset.DEV_PATH):
        save_pickle(path, random_images(1), [0])
    dataset.ensure_data(dataset.TRAIN_PATH, dataset.DEV_PATH)
    assert build_calls == []


def test_ensure_data_builds_missing_default_data(build_calls, monkeypatch):
    dataset.ensure_data(dataset.TRAIN_PATH, dataset.DEV_PATH, cifar_dir="/my/cifar")
    monkeypatch.setenv("CIFAR10_DIR", "/env/cifar")
    dataset.ensure_data(dataset.TRAIN_PATH, dataset.DEV_PATH)
    assert len(build_calls) == 2
    (args1, kw1), (args2, kw2) = build_calls
    assert args1[0] == "/my/cifar" and Path(kw1["out_dir"]) == Path("data")
    assert args2[0] == "/env/cifar"


def test_ensure_data_with_a_missing_source_stops_with_one_error(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UserError, match="no_such_cifar"):
        dataset.ensure_data(dataset.TRAIN_PATH, dataset.DEV_PATH, cifar_dir=str(tmp_path / "no_such_cifar"))


# ---------------------------------------------------------------------------
# The command line


def test_cli_build_with_missing_cifar_dir_is_one_error_line(tmp_path):
    result = run_script("dataset.py", "build", "--cifar-dir", tmp_path / "no_such_dir", cwd=tmp_path)
    assert_one_error_line(result, "no_such_dir")
    assert not (tmp_path / "data").exists()


def test_cli_insights_prints_counts_and_saves_figures(small_data, tmp_path):
    figures = tmp_path / "figs"
    result = run_script(
        "dataset.py", "insights", "--data", small_data / "train.pickle", "--dev-data", small_data / "dev.pickle",
        "--figures", figures, cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    for name in ("class_balance.png", "samples.png"):
        data = (figures / name).read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 1000
    rows = {line.split()[0]: line.split()[1:] for line in result.stdout.splitlines() if line.strip()}
    # small_data: train 300/60/200 true with 40 cats labeled car; dev 100/50/60.
    assert rows["train"] == ["560", "340", "60", "160"], result.stdout
    assert rows["dev"] == ["210", "100", "50", "60"], result.stdout
    assert not (tmp_path / "data").exists(), "insights built data it did not need"


def test_cli_insights_with_a_missing_data_file_is_one_error_line(tmp_path):
    result = run_script("dataset.py", "insights", "--data", tmp_path / "mine.pickle", cwd=tmp_path)
    assert_one_error_line(result, "mine.pickle")


# ---------------------------------------------------------------------------
# The default data, built from the local CIFAR-10 copy


@needs_cifar
def test_default_data_has_the_course_counts_and_noise(default_data):
    manifest = json.loads((default_data / "manifest.json").read_text())
    assert manifest["seed"] == 0
    assert manifest["train"] == {
        "true_counts": {"car": 4000, "truck": 400, "cat": 2000},
        "given_counts": {"car": 4600, "truck": 400, "cat": 1400},
    }
    assert manifest["dev"]["true_counts"] == manifest["dev"]["given_counts"] == {"car": 1000, "truck": 250, "cat": 500}

    # Best of two wall-clock timings, so one stall of a busy machine does not decide it.
    timings = []
    for _ in range(2):
        start = time.perf_counter()
        train_x, train_y = load_pickle(default_data / "train.pickle")
        timings.append(time.perf_counter() - start)
        if timings[-1] < 3:
            break
    assert min(timings) < 3, f"loading the default train pickle took {min(timings):.1f} s"
    dev_x, dev_y = load_pickle(default_data / "dev.pickle")
    assert class_counts(train_y) == [4600, 400, 1400] and len(train_x) == 6400
    assert class_counts(dev_y) == [1000, 250, 500] and len(dev_x) == 1750

    mislabeled = manifest["mislabeled"]
    indices = [entry["index"] for entry in mislabeled]
    assert len(set(indices)) == 600
    assert all((entry["given"], entry["true"]) == ("car", "cat") for entry in mislabeled)
    assert (train_y[indices] == 0).all()
    source = cifar_dir()
    if (source / "train" / "cat").is_dir():
        assert all((source / "train" / "cat" / entry["source"]).is_file() for entry in mislabeled[:50])

    def digests(images):
        return {hashlib.sha1(image.numpy().tobytes()).digest() for image in images}

    assert not digests(train_x) & digests(dev_x), "train and dev share images"
