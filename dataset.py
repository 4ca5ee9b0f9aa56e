"""Course data: load and write the pickled car/truck/cat sets, and build them from CIFAR-10.

    python dataset.py build      # data/train.pickle, data/dev.pickle, data/manifest.json
    python dataset.py insights   # class counts, figures/class_balance.png, figures/samples.png

A course data pickle is a list of (image, label) tuples: image is a float32 tensor
[3, 32, 32] normalized as (x - 0.5) / 0.5, label an int in {0: car, 1: truck, 2: cat}.
In memory a set is held as one image tensor [N, 3, 32, 32] plus one label tensor [N],
so training and evaluation slice batches instead of collating thousands of tensors.

The course's own names (MyDataset, get_dataset_as_array, get_dataset_as_torch_dataset,
un_normalize_image, label_names) are here too, as thin wrappers over the safe loader, so
code written against the course's dataset.py runs unchanged.
"""
import codecs
import collections
import io
import json
import os
import pickle
import re
import sys
import warnings
from pathlib import Path

import torch
from torch.utils.data import Dataset

from cli import (
    ArgumentParser, UserError, atomic_write, check_output_dir, int_in, read_input_file, run_main, seed_type,
)

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


# ---------------------------------------------------------------------------
# Reading and writing course pickles


# Untrusted files are parsed here, not handed to pickle or torch.load: every global a file
# may name is on an allowlist, and every size it declares is checked against the bytes it
# actually holds before anything is allocated.


class UnsafeFile(Exception):
    """A file that names something it may not (code, an unknown type) or claims more than it holds."""


class _RestrictedUnpickler(pickle.Unpickler):
    """Resolves only allowlisted globals.

    Reads from the file's bytes in memory. A BINBYTES opcode that declares more than the file
    holds fails as truncated; before that, Python's C unpickler reserves the declared length
    (untouched address space, not memory), which under an address-space limit is a
    MemoryError, reported like any other broken file.
    """

    def __init__(self, file, allowed, what, persistent_load=None):
        super().__init__(file)
        self.allowed, self.what = allowed, what
        if persistent_load is not None:
            self.persistent_load = persistent_load

    def find_class(self, module, name):
        try:
            return self.allowed[(module, name)]
        except KeyError:
            raise UnsafeFile(f"it refers to {module}.{name}, which a {self.what} never holds "
                             "(loading it could run code)") from None


class _Storage:
    """A storage read from a file: a 1-D tensor that tensors may view, within its bounds."""

    def __init__(self, tensor):
        self.tensor = tensor


class _StorageType:
    def __init__(self, dtype):
        self.dtype = dtype


_STORAGE_TYPES = {
    f"{name}Storage": _StorageType(dtype) for name, dtype in (
        ("Float", torch.float32), ("Double", torch.float64), ("Half", torch.float16),
        ("BFloat16", torch.bfloat16), ("Long", torch.int64), ("Int", torch.int32), ("Short", torch.int16),
        ("Char", torch.int8), ("Byte", torch.uint8), ("Bool", torch.bool),
    )
}
_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C  # torch's legacy (non-zip) serialization
_LEGACY_PROTOCOL = 1001
MAX_TENSOR_DIMS = 8


def _whole(value):
    return isinstance(value, int) and not isinstance(value, bool)


def _rebuild_tensor(storage, offset, size, stride, requires_grad=False, backward_hooks=None, metadata=None):
    """Stands in for torch._utils._rebuild_tensor(_v2): a view of a storage read from the file,
    after checking that every element it reaches lies inside that storage."""
    if not isinstance(storage, _Storage):
        raise UnsafeFile("a tensor is built from something that is not a storage")
    size, stride = tuple(size) if isinstance(size, (tuple, list)) else size, \
        tuple(stride) if isinstance(stride, (tuple, list)) else stride
    if not (_whole(offset) and offset >= 0 and isinstance(size, tuple) and isinstance(stride, tuple)
            and len(size) == len(stride) <= MAX_TENSOR_DIMS
            and all(_whole(v) and v >= 0 for v in (*size, *stride))):
        raise UnsafeFile(f"a tensor has an invalid layout (offset {offset!r}, size {size!r}, stride {stride!r})")
    n = storage.tensor.numel()
    if all(size):
        last = offset + sum((s - 1) * st for s, st in zip(size, stride))
        if last >= n:
            raise UnsafeFile(f"a tensor of size {list(size)} reaches element {last} of a storage of {n} elements")
    elif offset > n:
        raise UnsafeFile(f"a tensor starts at element {offset} of a storage of {n} elements")
    if backward_hooks or metadata:
        raise UnsafeFile("a tensor carries autograd hooks or Python attributes")
    tensor = storage.tensor.as_strided(size, stride, offset)
    if requires_grad is True and tensor.is_floating_point():
        tensor.requires_grad_(True)  # reported with its item index by the validation
    elif requires_grad is not False:
        raise UnsafeFile(f"a tensor has requires_grad={requires_grad!r}")
    return tensor


def rebuild_parameter(data, requires_grad, backward_hooks, *extra):
    """torch._utils._rebuild_parameter: a state_dict saved from named_parameters() holds these."""
    if backward_hooks or extra and extra[0]:
        raise UnsafeFile("a parameter carries autograd hooks or Python attributes")
    return data


def read_legacy_torch(data, allowed, what):
    """The object in torch's legacy (non-zip) serialization format, read within bounds.

    The layout: pickles of a magic number, a protocol version and system info; the object,
    whose storages are persistent ids (type, key, location, element count); the list of
    storage keys; then per storage an int64 element count and the raw little-endian bytes.
    torch's own reader allocates each storage at the count it declares before reading its
    data, so a few bytes can demand gigabytes; here the declared sizes together may not
    exceed the file's size, and each storage's data must match its declaration exactly.
    """
    f = io.BytesIO(data)

    def plain_pickle():
        return _RestrictedUnpickler(f, {}, what).load()

    try:
        torch_format = plain_pickle() == _LEGACY_MAGIC and plain_pickle() == _LEGACY_PROTOCOL
    except Exception:  # anything else at the start of the file
        torch_format = False
    if not torch_format:
        raise UnsafeFile("not in torch's serialization format")
    info = plain_pickle()
    if not isinstance(info, dict) or info.get("little_endian") is not True:
        raise UnsafeFile("written on a big-endian machine or with unknown system info; not supported")
    storages, claimed = {}, 0

    def persistent_load(saved_id):
        nonlocal claimed
        if not (isinstance(saved_id, tuple) and len(saved_id) == 6 and saved_id[0] == "storage"):
            raise UnsafeFile(f"unknown persistent object {str(saved_id)[:60]}")
        _, kind, key, _location, numel, view = saved_id  # location is ignored: data always lands on the CPU
        if not isinstance(kind, _StorageType) or not isinstance(key, str) or not _whole(numel) or numel < 0:
            raise UnsafeFile("a storage has an invalid declaration")
        if view is not None:
            raise UnsafeFile("storage views are not supported")
        if key in storages:
            known = storages[key].tensor
            if known.dtype != kind.dtype or known.numel() != numel:
                raise UnsafeFile(f"storage {key} is declared twice, differently")
            return storages[key]
        nbytes = numel * kind.dtype.itemsize
        claimed += nbytes
        if claimed > len(data):
            raise UnsafeFile(f"its storages claim {claimed:,} bytes but the {what} is only {len(data):,} bytes")
        storages[key] = _Storage(torch.empty(numel, dtype=kind.dtype))
        return storages[key]

    obj = _RestrictedUnpickler(f, {**allowed, **{("torch", n): t for n, t in _STORAGE_TYPES.items()}}, what,
                               persistent_load).load()
    keys = plain_pickle()
    if not isinstance(keys, list) or sorted(keys) != sorted(storages) or len(set(keys)) != len(keys):
        raise UnsafeFile("its list of storages does not match the storages it uses")
    for key in keys:
        tensor = storages[key].tensor
        count = int.from_bytes(f.read(8), "little", signed=True)
        if count != tensor.numel():
            raise UnsafeFile(f"storage {key} declares {tensor.numel()} elements but its data says {count}")
        nbytes = count * tensor.element_size()
        raw = f.read(nbytes)
        if len(raw) != nbytes:
            raise UnsafeFile(f"storage {key} is truncated ({len(raw)} of {nbytes} bytes)")
        if nbytes:
            tensor.view(-1).view(torch.uint8).copy_(torch.frombuffer(bytearray(raw), dtype=torch.uint8))
    if f.read(1):
        raise UnsafeFile("unexpected bytes after the last storage")
    return obj


class Budget:
    """Bytes a file may make the loader materialize, per kind: no more than the file holds."""

    def __init__(self, limit):
        self.limit, self.used = limit, collections.Counter()

    def take(self, kind, nbytes):
        self.used[kind] += nbytes
        if self.used[kind] > self.limit:
            raise UnsafeFile(f"it would expand to more than its own size ({self.limit:,} bytes) of {kind}; "
                             "a course data pickle never does")


# Each tensor object is charged this many bytes of the file: an image takes 12,288 bytes of
# pickled data and a label tensor about 400, so no real file comes near it, while a file
# that rebuilds one shared storage millions of times (a few bytes of pickle each) runs out.
TENSOR_OBJECT_COST = 256
IMAGE_BYTES = 3 * 32 * 32 * 4


def tensor_globals(budget):
    """The globals a pickled tensor needs (rebuilt within bounds), each tensor charged to budget."""

    def rebuild_tensor(*args):
        budget.take("tensor objects", TENSOR_OBJECT_COST)
        return _rebuild_tensor(*args)

    return {
        ("torch._utils", "_rebuild_tensor_v2"): rebuild_tensor,
        ("torch._utils", "_rebuild_tensor"): rebuild_tensor,
        ("collections", "OrderedDict"): collections.OrderedDict,
    }


def _course_globals(budget):
    """Everything a pickled list of (tensor, int) needs, and nothing else, each within the budget."""

    def latin1_encode(text, encoding="latin1"):
        # Pickle protocols 0-2 write bytes as _codecs.encode(str, 'latin1'); other codecs
        # ('hex', 'base64', nested) would let a few bytes expand without bound.
        if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
            raise UnsafeFile(f"it encodes {type(text).__name__} data with codec {encoding!r}")
        budget.take("decoded bytes", len(text))
        return codecs.encode(text, "latin1")

    def load_storage_bytes(data):
        # Stands in for torch.storage._load_from_bytes, which would unpickle with weights_only=False.
        if not isinstance(data, bytes):
            raise UnsafeFile("a storage is not stored as bytes")
        budget.take("tensor data", len(data))
        storage = read_legacy_torch(data, {}, "tensor storage")
        if not isinstance(storage, _Storage):
            raise UnsafeFile("a storage blob holds something other than one storage")
        return storage

    return {
        **tensor_globals(budget),
        ("torch.storage", "_load_from_bytes"): load_storage_bytes,
        ("_codecs", "encode"): latin1_encode,
    }


def _describe(value):
    if isinstance(value, torch.Tensor):
        return f"a {value.dtype} tensor of shape {list(value.shape)}"
    return f"a {type(value).__name__}"


def _check_label(label, where):
    """A course label: a Python int 0-2, or a 0-d integer tensor holding one."""
    if isinstance(label, torch.Tensor):
        if label.dim() != 0 or label.dtype.is_floating_point or label.dtype.is_complex or label.dtype == torch.bool:
            raise UserError(f"{where}: label is {_describe(label)}, expected an int 0 (car), 1 (truck) or 2 (cat)")
        label = int(label)
    if not _whole(label) or label not in (0, 1, 2):
        raise UserError(f"{where}: label {str(repr(label))[:40]} ({type(label).__name__}) is not an int "
                        "0 (car), 1 (truck) or 2 (cat)")
    return label


def _check_items(items, path, file_size):
    """Validate a loaded course list; return (images [N,3,32,32] float32, labels [N] int64)."""
    if not isinstance(items, (list, tuple)):
        raise UserError(f"{path}: expected a list of (image, label) tuples, found {type(items).__name__}")
    if len(items) == 0:
        raise UserError(f"{path}: the data set is empty")
    labels = []
    for i, item in enumerate(items):
        where = f"{path}: item {i}"
        if not isinstance(item, (tuple, list)) or len(item) != 2:
            raise UserError(f"{where} is not an (image, label) pair (found {_describe(item)})")
        image, label = item
        if not isinstance(image, torch.Tensor):
            raise UserError(f"{where}: image is {_describe(image)}, expected a float32 tensor [3, 32, 32]")
        if tuple(image.shape) != (3, 32, 32):
            raise UserError(f"{where}: image has shape {list(image.shape)}, expected [3, 32, 32]")
        if image.dtype != torch.float32:
            raise UserError(f"{where}: image has dtype {image.dtype}, expected torch.float32 in [-1, 1]")
        if image.requires_grad:
            raise UserError(f"{where}: image has requires_grad=True (autograd state); expected a plain tensor")
        labels.append(_check_label(label, where))
    if len(items) * IMAGE_BYTES > file_size:
        # Each image needs its 12,288 bytes in the file; more items means images reused by reference,
        # which would make stacking allocate far more than the file holds.
        raise UserError(f"{path}: refused: {len(items):,} items would need {len(items) * IMAGE_BYTES:,} bytes of "
                        f"images but the file holds {file_size:,}; the items share data by reference, which no "
                        "course data pickle does")
    images = torch.stack([image for image, _ in items])
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

    Memory stays bounded by the file: decoded bytes, tensor data and tensor objects may each
    total at most the file's size, and the stacked set must fit in it too, so a loader
    never holds more than about three times the file (its bytes, the items, the stacked set).
    """
    data = read_input_file(path, "data", hint=" (run `python dataset.py build` or pass --data)")
    if data[:4] == b"PK\x03\x04":
        raise UserError(f"{path}: a torch.save() zip archive, not a course data pickle (a pickle.dump of a list "
                        "of (image, label) tuples)")
    budget = Budget(len(data))
    try:
        items = _RestrictedUnpickler(io.BytesIO(data), _course_globals(budget), "course data pickle").load()
    except UnsafeFile as e:
        raise UserError(f"{path}: refused: {e}") from None
    except RecursionError:
        raise UserError(f"{path}: refused: nested too deeply for a course data pickle") from None
    except Exception as e:  # a broken file can fail inside unpickling in many ways; all mean the same
        detail = " ".join(str(e).split())[:120] or type(e).__name__
        raise UserError(f"{path}: unreadable or truncated data pickle ({type(e).__name__}: {detail})") from None
    return _check_items(items, path, len(data))


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


def get_dataset_as_array(path=TRAIN_PATH):
    """The course data pickle at path as a list of (FloatTensor [3, 32, 32], int), loaded safely."""
    return as_course_list(*load_pickle(path))


def get_dataset_as_torch_dataset(path=TRAIN_PATH, transform=None):
    """MyDataset over get_dataset_as_array(path): ready for a DataLoader."""
    return MyDataset(get_dataset_as_array(path), transform)


def un_normalize_image(img):
    """A normalized image [3, H, W] as an H x W x 3 numpy array in [0, 1], for imshow."""
    import numpy as np

    if isinstance(img, torch.Tensor):
        img = img.detach().cpu().numpy()
    return np.transpose(np.asarray(img) / 2 + 0.5, (1, 2, 0))


def to_unit(images):
    """Course images ([-1, 1]) to [0, 1] pixel scale."""
    return images * 0.5 + 0.5


def from_unit(pixels):
    """[0, 1] pixel scale to the course's normalized [-1, 1]."""
    return (pixels - 0.5) / 0.5


# ---------------------------------------------------------------------------
# Image files: your own photos (and the CIFAR-10 image tree)

# Image files are untrusted like any other input. Each is read whole through read_input_file
# (regular files only: a FIFO cannot block the read), opened only as one of IMAGE_FORMATS,
# refused when it declares more pixels than Pillow's decompression-bomb limit, decoded at
# reduced size where the codec can (JPEG), and shrunk to 32x32 before the next file is opened:
# the loaders never hold more than one full-size image.
IMAGE_FORMATS = ("JPEG", "PNG", "WEBP", "BMP", "GIF")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif")
# Pillow's default Image.MAX_IMAGE_PIXELS (a 1 GiB RGBA canvas / 3): about 89 megapixels.
MAX_IMAGE_PIXELS = 1024 * 1024 * 1024 // 4 // 3
IMAGE_SIZE = 32
# Class subfolder names (compared lower-cased): CIFAR's "automobile" is the project's "car".
CLASS_FOLDERS = {"car": 0, "automobile": 0, "truck": 1, "cat": 2}
SKIP_HINT = "or pass --skip-bad to skip bad files"
_EXIF_ORIENTATION = 0x0112


class BadImageFile(UserError):
    """One image file that cannot be used (missing, not an image, truncated, too large).

    Loaders of many files stop on it with one line, or skip it with --skip-bad; any other
    UserError (an unreadable folder, say) always stops them.
    """

    def __init__(self, path, problem, advice):
        super().__init__(f"{path}: {problem} ({advice})")
        self.path, self.problem, self.advice = path, problem, advice


def _warn(message):
    from tqdm import tqdm

    tqdm.write(f"warning: {message}", file=sys.stderr)  # above a running progress bar, not through it


def _pixel_limit():
    """Pillow's decompression-bomb limit, never looser than its default."""
    from PIL import Image

    return min(Image.MAX_IMAGE_PIXELS or MAX_IMAGE_PIXELS, MAX_IMAGE_PIXELS)


def _bomb(path, pixels):
    limit = _pixel_limit()
    shown = f"{pixels:,} pixels" if pixels else "more pixels than allowed"
    return BadImageFile(path, f"refused: it declares {shown}, more than Pillow's limit of {limit:,} (a "
                              "decompression bomb, or a picture too large)",
                        f"shrink it below {limit // 10**6} megapixels")


def _upright(image, orientation):
    """image turned the way EXIF orientation 1-8 says the camera held it (as ImageOps.exif_transpose)."""
    from PIL import Image

    method = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180, 4: Image.Transpose.FLIP_TOP_BOTTOM,
              5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE,
              8: Image.Transpose.ROTATE_90}.get(orientation)
    return image if method is None else image.transpose(method)


def _resizable(image):
    """image in a mode Pillow resizes with a real filter: RGB, L, or RGBA/LA (resized premultiplied)."""
    import numpy as np
    from PIL import Image

    if image.mode in ("RGB", "L", "RGBA", "LA"):
        return image
    if image.mode == "I" or image.mode.startswith("I;16"):
        # 16-bit greyscale PNG. Pillow's convert("L") clips at 255 instead of scaling, which would
        # turn almost every such photo white; keep the high byte instead.
        values = np.asarray(image)
        return Image.fromarray((np.clip(values, 0, 65535) >> 8).astype(np.uint8), mode="L")
    # Palette (GIF, PNG), 1-bit, CMYK (JPEG) and the rest: resize would use nearest neighbour on
    # palette and 1-bit images, so convert first; a palette with transparency keeps its alpha.
    return image.convert("RGBA" if image.has_transparency_data else "RGB")


def _on_white(image):
    """An RGB image: transparent pixels composited on white, as a viewer shows them."""
    from PIL import Image

    if image.mode not in ("RGBA", "LA"):
        return image.convert("RGB")
    rgba = image.convert("RGBA")
    return Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB")


def _shrink(image, path, advice, exact_size):
    """The opened image as uint8 RGB [3, 32, 32]: centre square, antialiased resize, upright."""
    import numpy as np
    from PIL import Image, JpegImagePlugin

    width, height = image.size
    if width * height > _pixel_limit():  # Pillow checks too; this holds even if its limit was turned off
        raise _bomb(path, width * height)
    if exact_size is not None and image.size != exact_size:
        raise BadImageFile(path, f"image is {width}x{height}, expected CIFAR's {exact_size[0]}x{exact_size[1]}",
                           advice)
    if isinstance(image, JpegImagePlugin.JpegImageFile) and min(image.size) >= 4 * IMAGE_SIZE:
        # libjpeg decodes at 1/2, 1/4 or 1/8 scale, keeping at least 64 pixels on the short side:
        # a 12-megapixel photo is decoded as 0.2 megapixels and never exists at full size.
        image.draft(None, (2 * IMAGE_SIZE, 2 * IMAGE_SIZE))
    orientation = image.getexif().get(_EXIF_ORIENTATION, 1)
    image = _resizable(image)
    width, height = image.size
    side = min(width, height)
    # The centred square keeps the aspect ratio. It is also the same square whichever way the
    # image is turned, so the EXIF turn is applied to the reduced square instead of to the
    # full-size image (which would copy it).
    left, top = (width - side) // 2, (height - side) // 2
    box = (left, top, left + side, top + side)
    # A large square is first averaged down by a whole factor to 96-191 pixels (reduce reads only
    # inside the box and never copies the full image), then BICUBIC, whose support widens with
    # the reduction, antialiases the rest: Pillow's reducing_gap=3 recipe, "indistinguishable
    # from fair resampling". resize(box=...) would instead let the filter reach past the crop.
    factor = side // (3 * IMAGE_SIZE)
    square = image.reduce(factor, box) if factor > 1 else image.crop(box)
    small = _upright(square, orientation).resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.BICUBIC)
    small = _on_white(small)
    return torch.from_numpy(np.array(small, dtype=np.uint8)).permute(2, 0, 1).contiguous()


def _image_pixels(path, advice="fix or remove the file", exact_size=None):
    """One image file as uint8 RGB pixels [3, 32, 32], or BadImageFile naming it.

    exact_size (width, height): refuse other sizes instead of resizing (the CIFAR-10 tree).
    """
    from PIL import Image, UnidentifiedImageError

    try:
        data = read_input_file(path, "photo")
    except UserError as e:  # missing, a folder, a FIFO or device, unreadable: already one line
        raise BadImageFile(path, str(e).removeprefix(f"{path}: "), advice) from None
    if not data:
        raise BadImageFile(path, "empty file (0 bytes), not an image", advice)
    try:
        with warnings.catch_warnings():
            # Pillow's notes on odd EXIF or palettes would break the one-line output; its
            # decompression-bomb warning (more than the limit, less than twice it) is an error here.
            warnings.simplefilter("ignore")
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data), formats=IMAGE_FORMATS) as image:
                return _shrink(image, path, advice, exact_size)
    except BadImageFile:
        raise
    except (Image.DecompressionBombWarning, Image.DecompressionBombError) as e:
        declared = re.search(r"\((\d+) pixels\)", str(e))
        raise _bomb(path, int(declared[1]) if declared else None) from None
    except UnidentifiedImageError:
        raise BadImageFile(path, "cannot decode image: not a JPEG, PNG, WebP, BMP or GIF file", advice) from None
    except MemoryError:
        raise BadImageFile(path, "cannot decode image: out of memory", "shrink it, or free some memory") from None
    except Exception as e:  # truncated or corrupt: Pillow raises OSError, SyntaxError, ValueError, ...
        detail = " ".join(str(e).split())[:120] or type(e).__name__
        raise BadImageFile(path, f"cannot decode image: truncated or corrupt ({detail})", advice) from None


def load_image(path):
    """One image file as a float32 tensor [3, 32, 32] normalized like the course data ((x - 0.5) / 0.5).

    Any size and mode of JPEG, PNG, WebP, BMP or GIF (its first frame): turned upright by its
    EXIF orientation, transparency composited on white, centre-cropped to a square (keeping
    the aspect ratio) and resized to 32x32 with an antialiasing filter. A file that cannot be
    used raises BadImageFile, one line naming it.
    """
    return from_unit(_image_pixels(path).float() / 255)


def _list_folder(folder):
    """(subfolders, other entries) directly inside folder, sorted by name, hidden ones left out.

    Nothing is followed further down, so a symlink loop cannot trap the listing; an entry
    that cannot be followed (a loop, a dangling link) counts as a file, and reading it fails
    with one line.
    """
    try:
        with os.scandir(folder) as listing:
            entries = sorted(listing, key=lambda entry: entry.name)
    except OSError as e:
        raise UserError(f"{folder}: cannot list the folder ({e.strerror or e})") from None
    subfolders, files = [], []
    for entry in entries:
        if entry.name.startswith("."):  # .DS_Store, macOS ._IMG_0001.jpg resource forks, ...
            continue
        try:
            is_folder = entry.is_dir()
        except OSError:
            is_folder = False
        (subfolders if is_folder else files).append(Path(entry.path))
    return subfolders, files


def printable_path(path):
    r"""path as text that any output can take: bytes that are not UTF-8 in a file name (an old
    camera's Latin-1 "caf\xe9.jpg") are shown as \xNN escapes instead of breaking the figure or JSON."""
    return str(path).encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def _names(paths, limit=4, folders=False):
    shown = ", ".join(p.name + "/" * folders for p in paths[:limit])
    return shown + (f" and {len(paths) - limit} more" if len(paths) > limit else "")


def _image_files_in(folder):
    """The image files directly inside folder, by name; a warning line names what else is there."""
    subfolders, files = _list_folder(folder)
    images = [p for p in files if p.suffix.lower() in IMAGE_EXTENSIONS]
    others = [p for p in files if p.suffix.lower() not in IMAGE_EXTENSIONS]
    if others:
        _warn(f"{folder}: skipping {len(others)} file{'s' * (len(others) > 1)} without an image extension "
              f"({' '.join(IMAGE_EXTENSIONS)}): {_names(others)}")
    return images, subfolders


def _load_each(paths, skip_bad):
    """Decode paths one by one into one tensor; return (images [K, 3, 32, 32], kept indices, skipped).

    Each file is decoded, shrunk to 32x32 and dropped before the next is opened. skipped lists
    {"path", "problem"} of the bad files when skip_bad, which otherwise stop the load at the
    first one.
    """
    from tqdm import tqdm

    images = torch.empty(len(paths), 3, IMAGE_SIZE, IMAGE_SIZE)
    kept, skipped = [], []
    for i, path in enumerate(tqdm(paths, desc="decoding images", unit="img", disable=None, file=sys.stderr)):
        try:
            pixels = _image_pixels(path)
        except BadImageFile as e:
            if not skip_bad:
                raise UserError(f"{e.path}: {e.problem} ({e.advice}, {SKIP_HINT})") from None
            _warn(f"{e.path}: {e.problem}; skipped")
            skipped.append({"path": printable_path(path), "problem": e.problem})
            continue
        images[len(kept)] = from_unit(pixels.float() / 255)
        kept.append(i)
    if not kept:
        raise UserError(f"none of the {len(paths)} image files could be read (each is named above); nothing to do")
    return images[: len(kept)].clone() if skipped else images, kept, skipped


def load_image_folder(folder, skip_bad=False):
    """A labeled set from a folder of class subfolders: car/ (or automobile/), truck/, cat/.

    Names match case-insensitively; other subfolders, and files outside the class subfolders,
    are named in a warning line and left out. Each image is read as load_image reads it.
    Returns (images [N, 3, 32, 32] float32, labels [N] int64, paths [N], skipped), in class
    order, then by file name; skipped lists the bad files left out with skip_bad.
    """
    folder = Path(folder)
    subfolders, files = _list_folder(folder)
    by_class = collections.defaultdict(list)
    unknown = []
    for sub in subfolders:
        label = CLASS_FOLDERS.get(sub.name.lower())
        (unknown if label is None else by_class[label]).append(sub)
    for entry in files:
        if entry.name.lower() in CLASS_FOLDERS:  # meant as a class folder, but not one we can open
            try:
                entry.stat()
                reason = "a file, not a folder"
            except OSError as e:  # a symlink loop, a dangling link
                reason = f"cannot open it ({e.strerror or e})"
            raise UserError(f"{entry}: expected a class folder, but {reason} (make it a folder of images)")
    loose = [p for p in files if p.suffix.lower() in IMAGE_EXTENSIONS]
    expected = "class subfolders car/ (or automobile/), truck/ and cat/ holding images"
    if not subfolders and not files:
        raise UserError(f"{folder}: the folder is empty (expected {expected})")
    if not by_class:
        found = f"found {_names(unknown, folders=True)}" if unknown else \
            f"found {len(files)} file{'s' * (len(files) > 1)} and no subfolders"
        advice = f"sort the images into car/, truck/ and cat/ subfolders, or predict them with --images {folder}" \
            if loose else f"expected {expected}"
        raise UserError(f"{folder}: no class subfolder car/, automobile/, truck/ or cat/ ({found}) ({advice})")
    if unknown:
        _warn(f"{folder}: skipping subfolder{'s' * (len(unknown) > 1)} {_names(unknown, 8, folders=True)} "
              "(not car, automobile, truck or cat)")
    if loose:
        _warn(f"{folder}: skipping {len(loose)} image file{'s' * (len(loose) > 1)} outside the class subfolders "
              f"(they have no label; predict them with --images): {_names(loose)}")
    paths, labels = [], []
    for label in sorted(by_class):
        for sub in by_class[label]:
            images, nested = _image_files_in(sub)
            if nested:
                _warn(f"{sub}: skipping subfolder{'s' * (len(nested) > 1)} {_names(nested, folders=True)} "
                      "(only the files directly inside a class folder are read)")
            paths += images
            labels += [label] * len(images)
    if not paths:
        names = ", ".join(f"{sub.name}/" for label in sorted(by_class) for sub in by_class[label])
        raise UserError(f"{folder}: no image files in {names} (expected {' '.join(IMAGE_EXTENSIONS)} files)")
    images, kept, skipped = _load_each(paths, skip_bad)
    return images, torch.tensor(labels)[kept], [paths[i] for i in kept], skipped


def load_image_files(sources, skip_bad=False):
    """Unlabeled images from files and folders (the image files directly inside, by name), in the order given.

    Returns (images [N, 3, 32, 32] float32, paths [N], skipped); see load_image_folder.
    """
    paths = []
    for source in map(Path, sources):
        if not source.is_dir():
            paths.append(source)  # whatever its name: the decoder says what is wrong with it
            continue
        images, subfolders = _image_files_in(source)
        has_classes = any(sub.name.lower() in CLASS_FOLDERS for sub in subfolders)
        if not images:
            advice = f"it has class subfolders: evaluate them with --data {source}" if has_classes else \
                f"expected {' '.join(IMAGE_EXTENSIONS)} files"
            raise UserError(f"{source}: no image files directly inside this folder ({advice})")
        if subfolders:
            _warn(f"{source}: skipping subfolder{'s' * (len(subfolders) > 1)} {_names(subfolders, folders=True)} "
                  "(only the files directly inside a folder are read"
                  + (f"; evaluate class subfolders with --data {source})" if has_classes else ")"))
        paths += images
    images, kept, skipped = _load_each(paths, skip_bad)
    return images, [paths[i] for i in kept], skipped


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


def warn_skipped(skipped, loaded):
    """The count that ends a run which skipped bad files (--skip-bad), as one warning line."""
    if skipped:
        total = len(skipped) + loaded
        print(f"warning: skipped {len(skipped)} of {total} file{'s' * (total > 1)} (bad images, each named "
              "above)", file=sys.stderr)


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
        found = [p for p in _list_folder(tree / name)[1] if p.suffix.lower() in exts]
        if not found:
            raise UserError(f"{tree / name}: no .jpg or .png images in this CIFAR-10 class folder")
        files.append(found)
    return files


def _decode(paths):
    # The same safe decoder as for your own photos (a FIFO or a decompression bomb in the tree
    # is one line), but CIFAR's images must already be 32x32: nothing is resized.
    advice = "replace it, or use another CIFAR-10 copy"
    return torch.stack([_image_pixels(p, advice, exact_size=(32, 32)) for p in paths])


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
        check_output_dir(args.figures, "--figures")
        ensure_data(args.data, args.dev_data, cifar_dir=args.cifar_dir)
        insights(args.data, args.dev_data, args.figures)


if __name__ == "__main__":
    run_main(main)
