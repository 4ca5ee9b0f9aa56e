"""Course data: load and write the pickled car/truck/cat sets, and build them from CIFAR-10.

    python dataset.py build      # data/train.pickle, data/dev.pickle, data/manifest.json
    python dataset.py insights   # class counts, figures/class_balance.png, figures/samples.png

A course data pickle is a list of (image, label) tuples: image is a float32 tensor
[3, 32, 32] normalized as (x - 0.5) / 0.5, label an int in {0: car, 1: truck, 2: cat}.
In memory a set is held as one image tensor [N, 3, 32, 32] plus one label tensor [N],
so training and evaluation slice batches instead of collating thousands of tensors.

The course's own names (MyDataset, get_dataset_as_array, get_dataset_as_torch_dataset,
un_normalize_image, label_names) are here too, as thin wrappers over the safe loader, so
code written against the course's dataset.py runs unchanged. Like the course's module, this
one imports numpy as np, torch, pickle and Dataset at module level and defines no __all__:
course code uses them after `from dataset import *`.
"""
import json
import os
import pickle
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from cli import (ArgumentParser, UserError, atomic_write, check_output_dir, describe, file_lock, int_in, pyplot,
                 run_main, save_figure, seed_type, whole)
from images import (
    IMAGE_EXTENSIONS, from_unit, image_pixels, list_folder, load_image_folder, to_unit,
)
from pickled_data import as_plain
from restricted_pickle import UnsafeFile
from untrusted import read_cifar_batch, read_pickle

CLASSES = ("car", "truck", "cat")
# CIFAR-10 folder names and label ids of the three classes, in the project's label order.
CIFAR_NAMES = ("automobile", "truck", "cat")
CIFAR_IDS = (1, 9, 3)

TRAIN_PATH = "data/train.pickle"
COURSE_DEFAULT_PATH = "./data/dataset.pickle"  # the default of the course's get_dataset_as_array
DEV_PATH = "data/dev.pickle"
MANIFEST_NAME = "manifest.json"
FIGURES_DIR = "figures"

# The course's defects: mostly cars, few trucks, and 600 of the 2,000 cats labeled "car".
DEFAULT_TRAIN_COUNTS = (4000, 400, 2000)
DEFAULT_DEV_COUNTS = (1000, 250, 500)
DEFAULT_MISLABELED = 600

VALUE_TOLERANCE = 1e-3
IMAGE_BYTES = 3 * 32 * 32 * 4


# ---------------------------------------------------------------------------
# Reading and writing course pickles


def _plain(value, where):
    """A numpy stand-in from the file as the tensor (or list) it stands for; one line if the file never
    gave it its data."""
    try:
        value = as_plain(value)
    except UnsafeFile as e:
        raise UserError(f"{where}: refused: {e}") from None
    return torch.from_numpy(value) if isinstance(value, np.ndarray) else value


def _check_label(label, where):
    """A course label 0-2: a Python int, or what course code also writes (a numpy int, a one-element
    integer tensor or array), as an int."""
    label = _plain(label, where)
    if isinstance(label, torch.Tensor):
        if label.numel() != 1 or label.dtype.is_floating_point or label.dtype.is_complex or label.dtype == torch.bool:
            raise UserError(f"{where}: label is {describe(label)}, expected an int 0 (car), 1 (truck) or 2 (cat)")
        label = int(label.reshape(()))
    if not whole(label) or label not in (0, 1, 2):
        raise UserError(f"{where}: label {describe(label)} ({type(label).__name__}) is not an int "
                        "0 (car), 1 (truck) or 2 (cat)")
    return label


def _check_image(image, where):
    """A course image: a float32 tensor [3, 32, 32], or what course code also writes (a numpy array, a
    batch of one [1, 3, 32, 32], float64 pixels: x.double()), as a float32 tensor [3, 32, 32]."""
    image = _plain(image, where)
    if not isinstance(image, torch.Tensor):
        raise UserError(f"{where}: image is {describe(image)}, expected a float32 tensor [3, 32, 32]")
    if tuple(image.shape) not in ((3, 32, 32), (1, 3, 32, 32)):
        raise UserError(f"{where}: image has shape {list(image.shape)}, expected [3, 32, 32]")
    if image.dtype not in (torch.float32, torch.float64):
        raise UserError(f"{where}: image has dtype {image.dtype}, expected torch.float32 in [-1, 1]")
    if image.requires_grad:
        raise UserError(f"{where}: image has requires_grad=True (autograd state); expected a plain tensor")
    if image.layout != torch.strided or image.is_meta:
        raise UserError(f"{where}: image is not a plain dense tensor ({image.layout}, {image.device})")
    # float64 pixels in [-1, 1] round to float32 losing nothing a photo holds (8 bits per channel).
    return image.reshape(3, 32, 32).float()


def _check_items(items, path, file_size):
    """Validate a loaded course list (or a pickled MyDataset of one); return (images [N,3,32,32] float32,
    labels [N] int64)."""
    items = _plain(items, path)
    if not isinstance(items, (list, tuple)):
        raise UserError(f"{path}: expected a list of (image, label) tuples, found {type(items).__name__}")
    if len(items) == 0:
        raise UserError(f"{path}: the data set is empty")
    images, labels = [], []
    for i, item in enumerate(items):
        where = f"{path}: item {i}"
        if not isinstance(item, (tuple, list)) or len(item) != 2:
            raise UserError(f"{where} is not an (image, label) pair (found {describe(item)})")
        images.append(_check_image(item[0], where))
        labels.append(_check_label(item[1], where))
    if len(items) * IMAGE_BYTES > file_size:
        # Each image needs its 12,288 bytes in the file; more items means images reused by reference,
        # which would make stacking allocate far more than the file holds.
        raise UserError(f"{path}: refused: {len(items):,} items would need {len(items) * IMAGE_BYTES:,} bytes of "
                        f"images but the file holds {file_size:,}; the items share data by reference, which no "
                        "course data pickle does")
    images = torch.stack(images)
    # One pass gives both checks: NaN propagates through min and max, and inf shows up in them.
    low, high = torch.aminmax(images.flatten(1), dim=1)
    finite = torch.isfinite(low) & torch.isfinite(high)
    if not finite.all():
        i = int((~finite).nonzero()[0])
        raise UserError(f"{path}: item {i}: image holds NaN or infinite values")
    bad = (low < -1 - VALUE_TOLERANCE) | (high > 1 + VALUE_TOLERANCE)
    if bad.any():
        i = int(bad.nonzero()[0])
        raise UserError(
            f"{path}: item {i}: pixel values span [{low[i]:.3f}, {high[i]:.3f}], expected [-1, 1] "
            "(images must be normalized as (x - 0.5) / 0.5)"
        )
    return images.clamp_(-1, 1), torch.tensor(labels, dtype=torch.long)


def load_pickle(path):
    """Load a course data pickle without running code from it; return (images, labels).

    Memory stays bounded by the file (untrusted.read_pickle), and the stacked set must fit in
    it too, so a loader never holds more than about three times the file (its bytes, the
    items, the stacked set).
    """
    items, file_size = read_pickle(path, "data", hint=" (run `python dataset.py build` or pass --data)")
    return _check_items(items, path, file_size)


def as_course_list(images, labels):
    """A list of (image [3,32,32] float32, int label): the course's in-memory format.

    Each image is its own copy: a view would pickle the whole shared storage every time.
    """
    return [(image.clone(), int(label)) for image, label in zip(images.float(), labels)]


def save_pickle(path, images, labels):
    """Write (images, labels) as a course data pickle: a list of (tensor [3,32,32], int)."""
    items = as_course_list(images, labels)
    atomic_write(path, lambda f: pickle.dump(items, f, protocol=pickle.HIGHEST_PROTOCOL))


# ---------------------------------------------------------------------------
# The course's dataset API: code written against the course's dataset.py runs unchanged.


def label_names():
    """{0: 'car', 1: 'truck', 2: 'cat'}"""
    return dict(enumerate(CLASSES))


class MyDataset(Dataset):
    """The course's Dataset over a list of (image, label) items.

    A transform, when given, receives the whole (image, label) item, as in the course.
    """

    def __init__(self, the_list, transform=None):
        self.the_list = the_list
        self.transform = transform

    def __len__(self):
        return len(self.the_list)

    def __getitem__(self, idx):
        item = self.the_list[idx]
        return self.transform(item) if self.transform else item


def _course_path(path):
    """The course's default ./data/dataset.pickle where it exists, else this project's training set."""
    return TRAIN_PATH if path == COURSE_DEFAULT_PATH and not Path(path).exists() else path


def get_dataset_as_array(path=COURSE_DEFAULT_PATH):
    """The course data pickle at path as a list of (FloatTensor [3, 32, 32], int), loaded safely.

    The default is the course's ./data/dataset.pickle; where that file does not exist,
    data/train.pickle is read. A missing file raises FileNotFoundError, as the course's does.
    """
    return as_course_list(*load_pickle(_course_path(path)))


def get_dataset_as_torch_dataset(path=COURSE_DEFAULT_PATH, transform=None):
    """MyDataset over get_dataset_as_array(path): ready for a DataLoader."""
    return MyDataset(get_dataset_as_array(path), transform)


def un_normalize_image(img):
    """A normalized image [3, H, W] as an H x W x 3 numpy array in [0, 1], for imshow."""
    if isinstance(img, torch.Tensor):
        img = img.detach().cpu().numpy()
    return np.transpose(np.asarray(img) / 2 + 0.5, (1, 2, 0))


# ---------------------------------------------------------------------------
# What --data names: a course pickle or a folder of labeled photos


def load_labeled_data(path, cifar_dir=None, skip_bad=False):
    """What --data names: a course pickle (built first if it is a missing default) or a folder of class
    subfolders. Returns (images, labels, paths or None for a pickle, skipped)."""
    if Path(path).is_dir():
        return load_image_folder(path, skip_bad)
    if skip_bad:
        raise UserError(f"--skip-bad applies to image files (--data FOLDER or --images), not to the data pickle "
                        f"{path}")
    if Path(path).suffix.lower() in IMAGE_EXTENSIONS:
        raise UserError(f"{path}: an image file, not a course data pickle (predict it with --images {path}, or "
                        "pass --data a folder with car/, truck/ and cat/ subfolders)")
    ensure_data(path, cifar_dir=cifar_dir)
    images, labels = load_pickle(path)
    return images, labels, None, []


# ---------------------------------------------------------------------------
# Building course-like data from CIFAR-10


def _find_batches_dir(root):
    for candidate in (root, root / "cifar-10-batches-py"):
        if (candidate / "data_batch_1").is_file():
            return candidate
    return None


def _find_image_tree(root):
    for candidate in (root / "train", root):
        if all((candidate / name).is_dir() for name in CIFAR_NAMES):
            return candidate
    return None


def _read_batches(batches_dir):
    """CIFAR-10 python batches (data_batch_1 to 5) -> per-class uint8 tensors [n, 3, 32, 32] (train split)."""
    paths = [batches_dir / f"data_batch_{k}" for k in range(1, 6)]
    missing = [p.name for p in paths if not p.is_file()]
    if missing:
        raise UserError(f"{batches_dir}: CIFAR-10 batches are incomplete ({', '.join(missing)} missing); download "
                        "them again or use another copy")
    batches = [read_cifar_batch(p) for p in paths]
    pixels = torch.from_numpy(np.concatenate([b[0] for b in batches])).reshape(-1, 3, 32, 32)
    targets = torch.tensor([label for b in batches for label in b[1]])
    return [pixels[targets == cifar_id] for cifar_id in CIFAR_IDS]


def _image_files(tree):
    exts = {".jpg", ".jpeg", ".png"}
    files = []
    for name in CIFAR_NAMES:
        found = [p for p in list_folder(tree / name)[1] if p.suffix.lower() in exts]
        if not found:
            raise UserError(f"{tree / name}: no .jpg or .png images in this CIFAR-10 class folder")
        files.append(found)
    return files


def _decode(paths):
    # The same safe decoder as for your own photos (a FIFO or a decompression bomb in the tree
    # is one line), but CIFAR's images must already be 32x32: nothing is resized.
    advice = "replace it, or use another CIFAR-10 copy"
    return torch.stack([image_pixels(p, advice, exact_size=(32, 32)) for p in paths])


def _download_cifar(data_dir):
    """CIFAR-10's python batches in data_dir/cifar-10-batches-py, downloaded unless a whole copy is there.

    torchvision's download checks the archive's MD5; the batches are then read like any local
    copy (read_cifar_batch), never by torchvision's CIFAR10, which would pickle.load them. The
    archive is fetched and unpacked in a folder of this process's own, and the batches renamed
    into place whole: processes that download at once (on a file system that ignores the build
    lock) each finish with a complete copy, never a mix.
    """
    from torchvision.datasets import CIFAR10
    from torchvision.datasets.utils import download_and_extract_archive

    target = Path(data_dir) / "cifar-10-batches-py"
    if all((target / f"data_batch_{k}").is_file() for k in range(1, 6)):
        return target
    print(f"Downloading CIFAR-10 into {data_dir}/ (about 170 MB) ...", file=sys.stderr)
    with tempfile.TemporaryDirectory(dir=data_dir, prefix=".cifar-10-download-") as tmp:
        try:
            download_and_extract_archive(CIFAR10.url, tmp, filename=CIFAR10.filename, md5=CIFAR10.tgz_md5)
        except Exception as e:  # urllib/ssl/socket errors all mean the same thing to the user
            raise UserError(
                f"could not download CIFAR-10 ({type(e).__name__}: {e}); offline, pass --cifar-dir DIR "
                "or set CIFAR10_DIR to a local CIFAR-10 copy (cifar-10-batches-py or train/<class>/*.jpg)"
            ) from None
        try:
            os.replace(Path(tmp) / "cifar-10-batches-py", target)
        except OSError:
            if not target.is_dir():  # else another process renamed its whole copy there first
                raise
    return target


def _select(sizes, counts_a, counts_b, generator):
    """Per class, a seeded choice of disjoint index sets of sizes counts_a and counts_b."""
    chosen_a, chosen_b = [], []
    for cls, (size, n_a, n_b) in enumerate(zip(sizes, counts_a, counts_b)):
        if n_a + n_b > size:
            raise UserError(
                f"asked for {n_a} + {n_b} {CLASSES[cls]} images but the CIFAR-10 source holds only {size}"
            )
        order = torch.randperm(size, generator=generator)
        chosen_a.append(order[:n_a])
        chosen_b.append(order[n_a : n_a + n_b])
    return chosen_a, chosen_b


def build_from_cifar(
    source=None,
    out_dir="data",
    seed=0,
    train_counts=DEFAULT_TRAIN_COUNTS,
    dev_counts=DEFAULT_DEV_COUNTS,
    mislabeled=DEFAULT_MISLABELED,
    quiet=False,
):
    """Build train.pickle, dev.pickle and manifest.json in out_dir from CIFAR-10's train split.

    source: a cifar-10-batches-py folder, an ImageFolder tree (train/<cifar class>/*.jpg),
    or None to download with torchvision into out_dir. The train set gets `mislabeled`
    of its cats labeled "car"; dev is disjoint from train and labeled correctly.
    Returns the manifest dict.
    """
    out_dir = Path(out_dir)
    if any(n < 0 for n in (*train_counts, *dev_counts, mislabeled)):
        raise UserError("counts and --mislabeled must not be negative")
    if mislabeled > train_counts[2]:
        raise UserError(f"--mislabeled {mislabeled} exceeds the {train_counts[2]} training cats")
    if sum(dev_counts) == 0 or sum(train_counts) == 0:
        raise UserError("train and dev sets must each hold at least one image")

    if source is None:
        check_output_dir(out_dir, "--out-dir")  # before a 170 MB download
        batches, tree = _download_cifar(out_dir), None
        source_name = "torchvision CIFAR-10 download"
    else:
        root = Path(source).expanduser()
        if not root.is_dir():
            raise UserError(f"{root}: CIFAR-10 folder not found (check --cifar-dir / CIFAR10_DIR)")
        batches, tree = _find_batches_dir(root), _find_image_tree(root)
        if batches is None and tree is None:
            raise UserError(
                f"{root}: not a CIFAR-10 copy: expected cifar-10-batches-py/data_batch_1 or "
                f"train/{{{','.join(CIFAR_NAMES)}}}/*.jpg"
            )
        source_name = str(root)
        check_output_dir(out_dir, "--out-dir")  # before minutes of decoding

    generator = torch.Generator().manual_seed(seed)
    if batches is not None:
        per_class = _read_batches(batches)
        sizes = [len(p) for p in per_class]
        train_idx, dev_idx = _select(sizes, train_counts, dev_counts, generator)
        train_pix = [p[i] for p, i in zip(per_class, train_idx)]
        dev_pix = [p[i] for p, i in zip(per_class, dev_idx)]
        source_ids = lambda cls, idx: idx.tolist()  # noqa: E731  (index within the class)
    else:
        files = _image_files(tree)
        sizes = [len(f) for f in files]
        train_idx, dev_idx = _select(sizes, train_counts, dev_counts, generator)
        if not quiet:
            print(f"Reading {sum(train_counts) + sum(dev_counts)} images from {tree} ...", file=sys.stderr)
        train_pix = [_decode([f[j] for j in i.tolist()]) for f, i in zip(files, train_idx)]
        dev_pix = [_decode([f[j] for j in i.tolist()]) for f, i in zip(files, dev_idx)]
        source_ids = lambda cls, idx: [files[cls][j].name for j in idx.tolist()]  # noqa: E731

    def assemble(pix, idx):
        true = torch.cat([torch.full((len(p),), cls) for cls, p in enumerate(pix)])
        images = from_unit(torch.cat(pix).float() / 255)
        origin = [s for cls, i in enumerate(idx) for s in source_ids(cls, i)]
        order = torch.randperm(len(true), generator=generator)  # mix classes, spread the noise
        return images[order], true[order], [origin[j] for j in order.tolist()]

    train_x, train_true, train_origin = assemble(train_pix, train_idx)
    dev_x, dev_true, _ = assemble(dev_pix, dev_idx)

    train_given = train_true.clone()
    cats = (train_true == CLASSES.index("cat")).nonzero().flatten()
    flipped = cats[torch.randperm(len(cats), generator=generator)[:mislabeled]].sort().values
    train_given[flipped] = CLASSES.index("car")

    save_pickle(out_dir / "train.pickle", train_x, train_given)
    save_pickle(out_dir / "dev.pickle", dev_x, dev_true)

    def counts(labels):
        return {name: int((labels == c).sum()) for c, name in enumerate(CLASSES)}

    manifest = {
        "source": source_name,
        "seed": seed,
        "train": {"true_counts": counts(train_true), "given_counts": counts(train_given)},
        "dev": {"true_counts": counts(dev_true), "given_counts": counts(dev_true)},
        "mislabeled": [
            {"index": int(i), "given": "car", "true": "cat", "source": train_origin[i]} for i in flipped.tolist()
        ],
    }
    atomic_write(out_dir / MANIFEST_NAME, lambda f: f.write(json.dumps(manifest, indent=1).encode()))
    if not quiet:
        print(
            f"Wrote {out_dir}/train.pickle ({counts(train_given)} given, {mislabeled} cats labeled car), "
            f"{out_dir}/dev.pickle ({counts(dev_true)}) and {out_dir}/{MANIFEST_NAME}",
            file=sys.stderr,
        )
    return manifest


def cifar_source(cifar_dir=None):
    """The local CIFAR-10 folder from --cifar-dir or CIFAR10_DIR, or None (download)."""
    return cifar_dir or os.environ.get("CIFAR10_DIR") or None


def ensure_data(*paths, cifar_dir=None):
    """Build the default data when a default data path is missing; other missing paths are errors.

    The build holds a lock in the data folder: of several processes that need the data at once
    (torchrun's, on one machine or on several sharing a file system), one builds and the others
    wait for it, then find the files there.
    """
    missing = [Path(p) for p in paths if not Path(p).exists()]
    if not missing:
        return
    defaults = {Path(TRAIN_PATH), Path(DEV_PATH)}
    custom = [p for p in missing if p not in defaults]
    if custom:
        raise UserError(f"{custom[0]}: no such data file")
    out_dir = check_output_dir(Path(TRAIN_PATH).parent, "data folder")
    with file_lock(out_dir / ".build.lock"):
        missing = [p for p in missing if not p.exists()]  # built meanwhile by the process that held the lock
        if not missing:
            return
        source = cifar_source(cifar_dir)
        print(f"{missing[0]} not found: building the default data from CIFAR-10 ({source or 'download'}) into "
              f"{out_dir}/", file=sys.stderr)
        build_from_cifar(source, out_dir=out_dir)


def class_counts(labels):
    return [int((labels == c).sum()) for c in range(len(CLASSES))]


# ---------------------------------------------------------------------------
# Figures (shared by every script) and insights (seed section 1)


def plot_class_balance(counts, path, title):
    plt = pyplot()

    fig, ax = plt.subplots(figsize=(5, 3.5))
    bars = ax.bar(CLASSES, counts, color=["tab:blue", "tab:orange", "tab:green"])
    ax.bar_label(bars)
    ax.set_ylabel("images")
    ax.set_title(title)
    ax.margins(y=0.12)
    fig.tight_layout()
    save_figure(fig, path)


def plot_samples(images, labels, path, per_class=8, seed=0, title="Training images by given label"):
    plt = pyplot()

    generator = torch.Generator().manual_seed(seed)
    fig, axes = plt.subplots(len(CLASSES), per_class, figsize=(per_class * 1.1, len(CLASSES) * 1.25))
    for cls, name in enumerate(CLASSES):
        members = (labels == cls).nonzero().flatten()
        picks = members[torch.randperm(len(members), generator=generator)[:per_class]]
        for j in range(per_class):
            ax = axes[cls, j]
            ax.axis("off")
            if j < len(picks):
                ax.imshow(to_unit(images[picks[j]]).permute(1, 2, 0).clamp(0, 1).numpy())
        axes[cls, 0].text(-4, 16, name, ha="right", va="center", fontsize=11)
    fig.suptitle(title)
    fig.tight_layout()
    save_figure(fig, path)


def insights(train_path, dev_path, figures_dir):
    train_x, train_y = load_pickle(train_path)
    dev_x, dev_y = load_pickle(dev_path)
    print(f"{'split':<6} {'images':>7} " + " ".join(f"{c:>7}" for c in CLASSES))
    for name, labels in (("train", train_y), ("dev", dev_y)):
        counts = class_counts(labels)
        print(f"{name:<6} {len(labels):>7} " + " ".join(f"{n:>7}" for n in counts))
    counts = class_counts(train_y)
    print(f"train: {counts[0] / len(train_y):.0%} of the given labels are 'car'")
    balance = Path(figures_dir) / "class_balance.png"
    samples = Path(figures_dir) / "samples.png"
    plot_class_balance(counts, balance, f"Training set: given labels ({len(train_y)} images)")
    plot_samples(train_x, train_y, samples)
    print(f"Saved {balance} and {samples}")


def parse_args(argv=None):
    parser = ArgumentParser(description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    build = sub.add_parser("build", help="build train/dev pickles and manifest.json from CIFAR-10",
                           description="Build data/train.pickle, data/dev.pickle and data/manifest.json from CIFAR-10.")
    count = int_in(0, 5000)  # CIFAR-10's training split holds 5,000 images per class
    build.add_argument("--cifar-dir", help="local CIFAR-10 copy (default: $CIFAR10_DIR, else download)")
    build.add_argument("--out-dir", default="data", help="where to write the pickles (default: data)")
    build.add_argument("--seed", type=seed_type, default=0, help="selection and noise seed (default: 0)")
    build.add_argument("--train-counts", type=count, nargs=3, metavar=("CAR", "TRUCK", "CAT"),
                       default=DEFAULT_TRAIN_COUNTS, help="true class counts of train (default: 4000 400 2000)")
    build.add_argument("--dev-counts", type=count, nargs=3, metavar=("CAR", "TRUCK", "CAT"),
                       default=DEFAULT_DEV_COUNTS, help="class counts of dev (default: 1000 250 500)")
    build.add_argument("--mislabeled", type=count, default=DEFAULT_MISLABELED,
                       help="training cats labeled 'car' (default: 600)")
    show = sub.add_parser("insights", help="print class counts and save class-balance and sample figures",
                          description="Print class counts; save figures/class_balance.png and figures/samples.png.")
    show.add_argument("--data", default=TRAIN_PATH, help=f"training pickle (default: {TRAIN_PATH})")
    show.add_argument("--dev-data", default=DEV_PATH, help=f"dev pickle (default: {DEV_PATH})")
    show.add_argument("--figures", default=FIGURES_DIR, help="output folder (default: figures)")
    show.add_argument("--cifar-dir", help="local CIFAR-10 copy used if the data must be built")
    return parser.parse_args(argv)


def main():
    args = parse_args()
    if args.command == "build":
        build_from_cifar(
            cifar_source(args.cifar_dir), args.out_dir, args.seed, args.train_counts, args.dev_counts, args.mislabeled
        )
    else:
        check_output_dir(args.figures, "--figures", create=False)
        ensure_data(args.data, args.dev_data, cifar_dir=args.cifar_dir)
        insights(args.data, args.dev_data, args.figures)


if __name__ == "__main__":
    run_main(main)
