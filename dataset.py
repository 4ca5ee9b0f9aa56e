"""Course data: load and write the pickled car/truck/cat sets, and build them from CIFAR-10.

    python dataset.py build      # data/train.pickle, data/dev.pickle, data/manifest.json
    python dataset.py insights   # class counts, figures/class_balance.png, figures/samples.png

A course data pickle is a list of (image, label) tuples: image is a float32 tensor
[3, 32, 32] normalized as (x - 0.5) / 0.5, label an int in {0: car, 1: truck, 2: cat}.
In memory a set is held as one image tensor [N, 3, 32, 32] plus one label tensor [N],
so training and evaluation slice batches instead of collating thousands of tensors.
"""
import argparse
import codecs
import collections
import io
import json
import os
import pickle
import sys
import tempfile
from pathlib import Path

import torch

CLASSES = ("car", "truck", "cat")
# CIFAR-10 folder names and label ids of the three classes, in the project's label order.
CIFAR_NAMES = ("automobile", "truck", "cat")
CIFAR_IDS = (1, 9, 3)

TRAIN_PATH = "data/train.pickle"
DEV_PATH = "data/dev.pickle"
MANIFEST_NAME = "manifest.json"
FIGURES_DIR = "figures"

# The course's defects: mostly cars, few trucks, and 600 of the 2,000 cats labeled "car".
DEFAULT_TRAIN_COUNTS = (4000, 400, 2000)
DEFAULT_DEV_COUNTS = (1000, 250, 500)
DEFAULT_MISLABELED = 600

VALUE_TOLERANCE = 1e-3


class UserError(Exception):
    """An expected mistake by the user (bad path, bad file, bad flag): shown as one line."""


def run_main(main):
    """Run a script's main(): user mistakes become one 'error:' line and exit status 1."""
    try:
        main()
    except UserError as e:
        sys.exit(f"{Path(sys.argv[0]).name}: error: {e}")
    except KeyboardInterrupt:
        sys.exit(130)
    except BrokenPipeError:  # `python tester.py | head` closed the pipe: not an error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit
        sys.exit(0)


def pick_device(name=None):
    """The requested torch device, or CUDA when available, else CPU."""
    if name in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as e:
        raise UserError(f"--device {name!r} is not a device name (use cpu, cuda or cuda:N)") from e
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {name} asked for CUDA, but torch sees no CUDA GPU; use --device cpu")
    return device


def atomic_write(path, write):
    """Call write(file) on a temporary file next to path, then rename it over path.

    A crash or kill -9 mid-write leaves the old file intact instead of a truncated one.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; give the file normal permissions
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


# ---------------------------------------------------------------------------
# Reading and writing course pickles


def _load_storage_bytes(data):
    # Stands in for torch.storage._load_from_bytes, which would unpickle the storage
    # with weights_only=False; weights_only=True cannot run code from the file.
    return torch.load(io.BytesIO(data), weights_only=True)


# Everything a pickled list of (tensor, int) needs, and nothing else.
_ALLOWED_GLOBALS = {
    ("torch._utils", "_rebuild_tensor_v2"): torch._utils._rebuild_tensor_v2,
    ("torch._utils", "_rebuild_tensor"): torch._utils._rebuild_tensor,
    ("torch.storage", "_load_from_bytes"): _load_storage_bytes,
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("_codecs", "encode"): codecs.encode,  # protocols 0-2 write bytes through it
}


class _CourseUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        try:
            return _ALLOWED_GLOBALS[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(
                f"refusing to load {module}.{name}: a course data pickle holds only tensors and ints"
            ) from None


def _check_items(items, path):
    """Validate a loaded course list; return (images [N,3,32,32] float32, labels [N] int64)."""
    if not isinstance(items, (list, tuple)):
        raise UserError(f"{path}: expected a list of (image, label) tuples, found {type(items).__name__}")
    if len(items) == 0:
        raise UserError(f"{path}: the data set is empty")
    labels = []
    for i, item in enumerate(items):
        where = f"{path}: item {i}"
        if not isinstance(item, (tuple, list)) or len(item) != 2:
            raise UserError(f"{where} is not an (image, label) pair")
        image, label = item
        if not isinstance(image, torch.Tensor):
            raise UserError(f"{where}: image is a {type(image).__name__}, expected a torch tensor")
        if tuple(image.shape) != (3, 32, 32):
            raise UserError(f"{where}: image has shape {list(image.shape)}, expected [3, 32, 32]")
        if not image.is_floating_point():
            raise UserError(f"{where}: image has dtype {image.dtype}, expected float32 in [-1, 1]")
        if isinstance(label, torch.Tensor) and label.numel() == 1 and not label.is_floating_point():
            label = int(label)
        if not isinstance(label, int) or isinstance(label, bool) or label not in (0, 1, 2):
            raise UserError(f"{where}: label {label!r} is not one of 0 (car), 1 (truck), 2 (cat)")
        labels.append(label)
    images = torch.stack([image for image, _ in items]).float()
    finite = torch.isfinite(images).flatten(1).all(1)
    if not finite.all():
        i = int((~finite).nonzero()[0])
        raise UserError(f"{path}: item {i}: image holds NaN or infinite values")
    low, high = images.flatten(1).amin(1), images.flatten(1).amax(1)
    bad = (low < -1 - VALUE_TOLERANCE) | (high > 1 + VALUE_TOLERANCE)
    if bad.any():
        i = int(bad.nonzero()[0])
        raise UserError(
            f"{path}: item {i}: pixel values span [{low[i]:.3f}, {high[i]:.3f}], expected [-1, 1] "
            "(images must be normalized as (x - 0.5) / 0.5)"
        )
    return images.clamp_(-1, 1), torch.tensor(labels, dtype=torch.long)


def load_pickle(path):
    """Load a course data pickle without running code from it; return (images, labels)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such data file (run `python dataset.py build` or pass --data)")
    try:
        with open(path, "rb") as f:
            items = _CourseUnpickler(f).load()
    except pickle.UnpicklingError as e:
        raise UserError(f"{path}: not a course data pickle: {e}") from None
    except (EOFError, ValueError, TypeError, AttributeError, IndexError, KeyError, RuntimeError, OSError) as e:
        raise UserError(f"{path}: unreadable or truncated data pickle ({type(e).__name__}: {e})") from None
    return _check_items(items, path)


def save_pickle(path, images, labels):
    """Write (images, labels) as a course data pickle: a list of (tensor [3,32,32], int)."""
    # One clone per image: a view would pickle the whole shared storage every time.
    items = [(image.clone(), int(label)) for image, label in zip(images.float(), labels)]
    atomic_write(path, lambda f: pickle.dump(items, f, protocol=pickle.HIGHEST_PROTOCOL))


def to_unit(images):
    """Course images ([-1, 1]) to [0, 1] pixel scale."""
    return images * 0.5 + 0.5


def from_unit(pixels):
    """[0, 1] pixel scale to the course's normalized [-1, 1]."""
    return (pixels - 0.5) / 0.5


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
    """CIFAR-10 python batches -> per-class uint8 tensors [n, 3, 32, 32] (train split)."""
    from torchvision.datasets import CIFAR10

    try:
        cifar = CIFAR10(str(batches_dir.parent), train=True, download=False)
    except RuntimeError as e:
        raise UserError(f"{batches_dir}: CIFAR-10 batches are incomplete or corrupted ({e})") from None
    pixels = torch.from_numpy(cifar.data).permute(0, 3, 1, 2).contiguous()
    targets = torch.tensor(cifar.targets)
    return [pixels[targets == cifar_id] for cifar_id in CIFAR_IDS]


def _image_files(tree):
    exts = {".jpg", ".jpeg", ".png"}
    files = []
    for name in CIFAR_NAMES:
        found = sorted(p for p in (tree / name).iterdir() if p.suffix.lower() in exts)
        if not found:
            raise UserError(f"{tree / name}: no .jpg or .png images in this CIFAR-10 class folder")
        files.append(found)
    return files


def _decode(paths):
    import numpy as np
    from PIL import Image, UnidentifiedImageError

    images = []
    for p in paths:
        try:
            with Image.open(p) as image:
                pixels = np.asarray(image.convert("RGB"))
        except (OSError, UnidentifiedImageError) as e:
            raise UserError(f"{p}: cannot decode image ({e})") from None
        if pixels.shape[:2] != (32, 32):
            raise UserError(f"{p}: image is {pixels.shape[1]}x{pixels.shape[0]}, expected CIFAR's 32x32")
        images.append(torch.from_numpy(pixels.copy()).permute(2, 0, 1))
    return torch.stack(images)


def _download_cifar(data_dir):
    from torchvision.datasets import CIFAR10

    print(f"Downloading CIFAR-10 into {data_dir}/ (about 170 MB) ...", file=sys.stderr)
    try:
        CIFAR10(str(data_dir), train=True, download=True)
    except Exception as e:  # urllib/ssl/socket errors all mean the same thing to the user
        raise UserError(
            f"could not download CIFAR-10 ({type(e).__name__}: {e}); offline, pass --cifar-dir DIR "
            "or set CIFAR10_DIR to a local CIFAR-10 copy (cifar-10-batches-py or train/<class>/*.jpg)"
        ) from None
    return Path(data_dir) / "cifar-10-batches-py"


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
    """Build the default data when a default data path is missing; other missing paths are errors."""
    missing = [Path(p) for p in paths if not Path(p).exists()]
    if not missing:
        return
    defaults = {Path(TRAIN_PATH), Path(DEV_PATH)}
    custom = [p for p in missing if p not in defaults]
    if custom:
        raise UserError(f"{custom[0]}: no such data file")
    source = cifar_source(cifar_dir)
    print(
        f"{missing[0]} not found: building the default data from CIFAR-10 "
        f"({source or 'download'}) into {Path(TRAIN_PATH).parent}/",
        file=sys.stderr,
    )
    build_from_cifar(source, out_dir=Path(TRAIN_PATH).parent)


def class_counts(labels):
    return [int((labels == c).sum()) for c in range(len(CLASSES))]


# ---------------------------------------------------------------------------
# Figures (shared by every script) and insights (seed section 1)


def pyplot():
    """matplotlib.pyplot on the Agg backend: figures render headless, no display needed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path, dpi=120):
    """Write fig as a PNG atomically (creating the folder) and free it."""
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=dpi))
    pyplot().close(fig)


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
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    build = sub.add_parser("build", help="build train/dev pickles and manifest.json from CIFAR-10")
    build.add_argument("--cifar-dir", help="local CIFAR-10 copy (default: $CIFAR10_DIR, else download)")
    build.add_argument("--out-dir", default="data", help="where to write the pickles (default: data)")
    build.add_argument("--seed", type=int, default=0, help="selection and noise seed (default: 0)")
    build.add_argument("--train-counts", type=int, nargs=3, metavar=("CAR", "TRUCK", "CAT"),
                       default=DEFAULT_TRAIN_COUNTS, help="true class counts of train (default: 4000 400 2000)")
    build.add_argument("--dev-counts", type=int, nargs=3, metavar=("CAR", "TRUCK", "CAT"),
                       default=DEFAULT_DEV_COUNTS, help="class counts of dev (default: 1000 250 500)")
    build.add_argument("--mislabeled", type=int, default=DEFAULT_MISLABELED,
                       help="training cats labeled 'car' (default: 600)")
    show = sub.add_parser("insights", help="print class counts and save class-balance and sample figures")
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
        ensure_data(args.data, args.dev_data, cifar_dir=args.cifar_dir)
        insights(args.data, args.dev_data, args.figures)


if __name__ == "__main__":
    run_main(main)
