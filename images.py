"""Image files: your own photos, folders of them, and the CIFAR-10 image tree, as course-normalized tensors.

    load_image(path)                 one file -> float32 [3, 32, 32] in [-1, 1]
    load_image_folder(folder)        car/ (or automobile/), truck/, cat/ subfolders -> images, labels, paths
    load_image_files(files_or_dirs)  unlabeled files -> images, paths

Any size and mode of JPEG, PNG, WebP, BMP or GIF is turned upright by its EXIF orientation,
composited on white, centre-cropped to a square and reduced to 32x32 with an antialiasing
filter, then normalized as the course's data is: (x - 0.5) / 0.5.
"""
import collections
import io
import os
import re
import sys
import warnings
from pathlib import Path

import torch

from cli import UserError, one_line
from untrusted import read_input_file


def to_unit(images):
    """Course images ([-1, 1]) to [0, 1] pixel scale."""
    return images * 0.5 + 0.5


def from_unit(pixels):
    """[0, 1] pixel scale to the course's normalized [-1, 1]."""
    return (pixels - 0.5) / 0.5


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
# A progressive JPEG is decoded once per scan over the whole image, at any draft size: a file can
# repeat one scan thousands of times (a 630 KB file took minutes). Cameras and encoders write
# about 10; an embedded thumbnail or second picture adds a few.
MAX_JPEG_SCANS = 100
# Pillow decodes run-length BMPs in Python, a byte at a time: 40 KB declaring 89 megapixels took 12 s.
MAX_RLE_BMP_PIXELS = 16 * 10**6
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


def _png_chunks(data, kind):
    """How many chunks of this kind a PNG's bytes hold (walking the chunk headers, never inflating)."""
    count, at = 0, 8
    while at + 8 <= len(data):
        count += data[at + 4 : at + 8] == kind
        at += 12 + int.from_bytes(data[at : at + 4], "big")
    return count


def _check_decoding_cost(image, data, path, advice):
    """Refuse what would take Pillow minutes although its pixel count is within the limit."""
    # Every start-of-scan marker is counted, a thumbnail's too (never fewer than there are);
    # a multi-picture JPEG (MPO, as phones write) is a JPEG here.
    scans = data.count(b"\xff\xda") if image.format in ("JPEG", "MPO") else 0
    if scans > MAX_JPEG_SCANS:
        raise BadImageFile(path, f"refused: a JPEG of {scans:,} scans (an encoder writes about 10; over "
                                 f"{MAX_JPEG_SCANS} makes decoding take minutes)", advice)
    pixels = image.width * image.height
    if image.format == "BMP" and image.info.get("compression") in (1, 2) and pixels > MAX_RLE_BMP_PIXELS:
        raise BadImageFile(path, f"refused: a run-length BMP of {pixels:,} pixels (over {MAX_RLE_BMP_PIXELS:,} "
                                 "decodes slowly)", "save it as PNG or JPEG")


def image_pixels(path, advice="fix or remove the file", exact_size=None):
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
    # Pillow inflates each colour profile as it opens a PNG (a megabyte each); a PNG has at most one.
    if data.startswith(b"\x89PNG\r\n\x1a\n") and _png_chunks(data, b"iCCP") > 1:
        raise BadImageFile(path, "refused: a PNG with more than one colour profile (iCCP chunk)", advice)
    try:
        with warnings.catch_warnings():
            # Pillow's notes on odd EXIF or palettes would break the one-line output; its
            # decompression-bomb warning (more than the limit, less than twice it) is an error here.
            warnings.simplefilter("ignore")
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data), formats=IMAGE_FORMATS) as image:
                _check_decoding_cost(image, data, path, advice)
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
        raise BadImageFile(path, f"cannot decode image: truncated or corrupt ({one_line(e)})", advice) from None


def load_image(path):
    """One image file as a float32 tensor [3, 32, 32] normalized like the course data ((x - 0.5) / 0.5).

    Any size and mode of JPEG, PNG, WebP, BMP or GIF (its first frame): turned upright by its
    EXIF orientation, transparency composited on white, centre-cropped to a square (keeping
    the aspect ratio) and resized to 32x32 with an antialiasing filter. A file that cannot be
    used raises BadImageFile, one line naming it.
    """
    return from_unit(image_pixels(path).float() / 255)


def list_folder(folder):
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
    subfolders, files = list_folder(folder)
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
            pixels = image_pixels(path)
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
    subfolders, files = list_folder(folder)
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


def warn_skipped(skipped, loaded):
    """The count that ends a run which skipped bad files (--skip-bad), as one warning line."""
    if skipped:
        total = len(skipped) + loaded
        print(f"warning: skipped {len(skipped)} of {total} file{'s' * (total > 1)} (bad images, each named "
              "above)", file=sys.stderr)
