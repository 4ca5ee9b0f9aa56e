"""Your own photos: image files decoded, cropped and scored by tester.py (--data FOLDER, --images).

Every image here is made by hand in a few milliseconds: solid colours, strips and quadrants
whose expected 32x32 result is known, plus bad files of each kind (not an image, truncated,
empty, decompression bombs, FIFOs, symlink loops). Script runs go through the warm runner,
under an address-space limit where a bomb that got through would fail the case.
"""
import io
import json
import os
import re
import shutil
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps, JpegImagePlugin

import dataset
import models
from cli import UserError
from conftest import ROOT, assert_one_error_line, cifar_dir, needs_cifar, run_script, softmax_by_hand
from images import CLASS_FOLDERS, BadImageFile, from_unit, load_image, load_image_files, load_image_folder, to_unit

PRETRAINED = ROOT / "checkpoints" / "pre_trained.ckpt"
MEMORY_LIMIT = 6 * 2**30  # as in test_hostile_inputs: importing torch needs about 3 GiB of address space
RED, GREEN, BLUE, WHITE = (255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 255)


def rgb(tensor):
    """A loaded image [3, 32, 32] in [-1, 1] as uint8-scale integers [32, 32, 3]."""
    return (to_unit(tensor) * 255).round().int().permute(1, 2, 0)


def solid(colour, size=(40, 30), mode="RGB"):
    return Image.new("RGB", size, colour).convert(mode)


def png_declaring(width, height, bit_depth=8, colour_type=2, rows=b""):
    """A PNG whose header declares width x height, followed by whatever rows are given."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, bit_depth, colour_type, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows))
            + chunk(b"IEND", b""))


def png16_rgb(value, size=8):
    """A 16-bit RGB PNG of one colour (Pillow cannot write one)."""
    row = b"\x00" + struct.pack(">H", value) * 3 * size
    return png_declaring(size, size, bit_depth=16, colour_type=2, rows=row * size)


def animated_gif(path):
    frames = [solid(RED), solid(GREEN)]
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=100)


def palette_with_transparency(path):
    image = Image.new("P", (40, 40), 0)
    image.putpalette([*RED, *BLUE] + [0] * 762)
    image.paste(1, (0, 20, 40, 40))  # bottom half: palette index 1, declared transparent
    image.save(path, transparency=1)


def half_transparent(path, **kwargs):
    image = Image.new("RGBA", (40, 40), (*BLUE, 0))
    image.paste((*RED, 255), (0, 0, 40, 20))  # top half opaque red, bottom half fully transparent
    image.save(path, **kwargs)


# name -> (write(path), expected colour of the top-left and bottom-left quarter, tolerance)
FORMAT_CASES = {
    "rgb.jpg": (lambda p: solid((200, 30, 60)).save(p, quality=95), (200, 30, 60), 6),
    "rgb.png": (lambda p: solid((200, 30, 60)).save(p), (200, 30, 60), 0),
    "rgb.webp": (lambda p: solid((200, 30, 60)).save(p, lossless=True), (200, 30, 60), 0),
    "rgb.bmp": (lambda p: solid((200, 30, 60)).save(p), (200, 30, 60), 0),
    "palette.gif": (lambda p: solid(RED, mode="P").save(p), RED, 0),
    "animated.gif (first frame)": (animated_gif, RED, 0),
    "grey.png": (lambda p: solid((90, 90, 90), mode="L").save(p), (90, 90, 90), 0),
    "grey.jpg": (lambda p: solid((90, 90, 90), mode="L").save(p, quality=95), (90, 90, 90), 3),
    "palette.png": (lambda p: solid(BLUE, mode="P").save(p), BLUE, 0),
    "cmyk.jpg": (lambda p: solid((200, 30, 60), mode="CMYK").save(p, quality=95), (200, 30, 60), 6),
    "progressive.jpg": (lambda p: solid((200, 30, 60)).save(p, quality=95, progressive=True), (200, 30, 60), 3),
    "colour-profile.png": (lambda p: Path(p).write_bytes(png_with_profiles(1)), RED, 0),
    "grey-alpha.png": (lambda p: solid((90, 90, 90), mode="LA").save(p), (90, 90, 90), 0),
    "bilevel.bmp": (lambda p: solid(WHITE, mode="1").save(p), WHITE, 0),
    # 16-bit: the high byte (40000 >> 8 = 156), where a plain convert("L") would clip to 255
    "grey16.png": (lambda p: Image.fromarray(np.full((30, 40), 40000, np.uint16)).save(p), (156, 156, 156), 0),
    "rgb16.png": (lambda p: Path(p).write_bytes(png16_rgb(40000)), (156, 156, 156), 0),
}
# Transparent pixels are composited on white: top half opaque red, bottom half white.
ALPHA_CASES = {
    "rgba.png": lambda p: half_transparent(p),
    "rgba.webp": lambda p: half_transparent(p, lossless=True),
    "palette-transparency.png": palette_with_transparency,
    "palette-transparency.gif": palette_with_transparency,
}


@pytest.mark.parametrize("case", list(FORMAT_CASES))
def test_formats_and_modes_decode_to_a_normalized_32x32_rgb_tensor(case, tmp_path):
    write, colour, tolerance = FORMAT_CASES[case]
    path = tmp_path / case.split(" ")[0]
    write(path)
    image = load_image(path)
    assert image.shape == (3, 32, 32) and image.dtype == torch.float32
    assert -1 <= image.min() and image.max() <= 1
    assert (rgb(image) - torch.tensor(colour)).abs().max() <= tolerance, rgb(image)[16, 16]


@pytest.mark.parametrize("case", list(ALPHA_CASES))
def test_transparency_is_composited_on_white(case, tmp_path):
    path = tmp_path / case
    ALPHA_CASES[case](path)
    pixels = rgb(load_image(path))
    assert pixels[:15].sub(torch.tensor(RED)).abs().max() <= 1
    assert pixels[17:].sub(torch.tensor(WHITE)).abs().max() <= 1


def strips(width, height, side_colours=(BLUE, GREEN)):
    """A red centred square (side min(width, height)) between two strips of other colours."""
    a = np.zeros((height, width, 3), np.uint8)
    a[:] = RED
    side = min(width, height)
    if width > height:
        left = (width - side) // 2
        a[:, :left], a[:, left + side:] = side_colours
    else:
        top = (height - side) // 2
        a[:top], a[top + side:] = side_colours
    return Image.fromarray(a)


@pytest.mark.parametrize("size", [(96, 64), (64, 96), (33, 32), (500, 300), (300, 2000)])
def test_aspect_ratio_is_kept_by_a_centre_crop(size, tmp_path):
    # Squashing the whole picture into 32x32 would bring the blue and green strips in.
    path = tmp_path / "strips.png"
    strips(*size).save(path)
    assert torch.equal(rgb(load_image(path)), torch.tensor(RED).expand(32, 32, 3))


def test_large_jpeg_is_decoded_at_reduced_size(tmp_path, monkeypatch):
    # libjpeg's DCT scaling: a 3072x2048 photo is decoded as 384x256, never at full size.
    path = tmp_path / "photo.jpg"
    strips(3072, 2048).save(path, quality=90, subsampling=0)  # strips end on 8x8 blocks of the 1/8 scale
    decoded = []
    draft = JpegImagePlugin.JpegImageFile.draft

    def spy(self, mode, size):
        result = draft(self, mode, size)
        decoded.append(self.size)
        return result

    monkeypatch.setattr(JpegImagePlugin.JpegImageFile, "draft", spy)
    pixels = rgb(load_image(path))
    assert decoded == [(384, 256)]
    assert (pixels - torch.tensor(RED)).abs().max() <= 12  # still only the red centre


def quadrants(width=96, height=64):
    """Red, green / blue, white quadrants in the centred square, grey strips outside it."""
    a = np.full((height, width, 3), 128, np.uint8)
    side = min(width, height)
    left, top, h = (width - side) // 2, (height - side) // 2, side // 2
    for (r, c), colour in zip([(0, 0), (0, 1), (1, 0), (1, 1)], [RED, GREEN, BLUE, WHITE]):
        a[top + r * h: top + (r + 1) * h, left + c * h: left + (c + 1) * h] = colour
    return Image.fromarray(a)


def quadrant_colours(pixels):
    return [tuple(pixels[y, x].tolist()) for y, x in ((8, 8), (8, 24), (24, 8), (24, 24))]


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_is_applied(orientation, tmp_path):
    original = quadrants()
    exif = Image.Exif()
    exif[0x0112] = orientation
    for name, kwargs in (("turned.png", {}), ("turned.jpg", {"quality": 95, "subsampling": 0})):
        path = tmp_path / name
        original.save(path, exif=exif, **kwargs)
        upright = ImageOps.exif_transpose(Image.open(path))  # Pillow's own reading of the tag, at full size
        square = (16, 0, 80, 64) if upright.width > upright.height else (0, 16, 64, 80)
        expected = quadrant_colours(np.array(upright.crop(square).resize((32, 32), Image.Resampling.NEAREST)))
        got = quadrant_colours(rgb(load_image(path)))
        tolerance = 0 if name.endswith(".png") else 8
        for g, e in zip(got, expected):
            assert max(abs(a - b) for a, b in zip(g, e)) <= tolerance, (name, got, expected)
        # Turning the cropped square equals turning the full picture first, then cropping and resizing.
        reference = tmp_path / f"upright-{name}.png"
        upright.save(reference)
        if name.endswith(".png"):
            assert torch.equal(load_image(path), load_image(reference))


# ---------------------------------------------------------------------------
# Bad files: each refused with one line naming it, or skipped with --skip-bad


def truncated(fmt):
    def write(path):
        buffer = io.BytesIO()
        Image.fromarray(np.random.default_rng(0).integers(0, 256, (200, 300, 3), np.uint8)).save(buffer, fmt)
        path.write_bytes(buffer.getvalue()[: buffer.tell() // 2])
    return write


def gif_declaring(width, height):
    return (b"GIF89a" + struct.pack("<HHBBB", width, height, 0, 0, 0) + b","
            + struct.pack("<HHHHB", 0, 0, width, height, 0) + b"\x02\x02\x4c\x01\x00;")


def mpo_with_scans(extra):
    """A multi-picture JPEG (MPO, as phones write) whose first picture repeats its last scan."""
    def write(path):
        buffer = io.BytesIO()
        solid(RED, size=(64, 64)).save(buffer, "MPO", save_all=True, append_images=[solid(BLUE, size=(16, 16))],
                                       progressive=True)
        data = buffer.getvalue()
        end = data.find(b"\xff\xd9")
        scan = data[data.rfind(b"\xff\xda", 0, end): end]
        path.write_bytes(data[:end] + scan * extra + data[end:])
    return write


def rle_bmp(width, height):
    """A run-length (RLE8) BMP declaring width x height, its data only the end-of-bitmap code."""
    palette, pixels = b"\0" * 4 * 256, b"\x00\x01"
    offset = 14 + 40 + len(palette)
    return (struct.pack("<2sIHHI", b"BM", offset + len(pixels), 0, 0, offset)
            + struct.pack("<IiiHHIIiiII", 40, width, height, 1, 8, 1, len(pixels), 2835, 2835, 256, 0)
            + palette + pixels)


def png_with_profiles(n):
    """A small PNG holding n colour profiles (iCCP chunks), each inflating to 1 MB."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    buffer = io.BytesIO()
    solid(RED).save(buffer, "PNG")
    data = buffer.getvalue()
    after_header = 8 + 25  # signature, then IHDR (13 bytes of data and 12 of length, type and CRC)
    profile = chunk(b"iCCP", b"icc\0\0" + zlib.compress(b"\0" * 2**20))
    return data[:after_header] + profile * n + data[after_header:]


def tiff_named_jpg(path):
    solid(RED).save(path, format="TIFF")


def progressive_jpeg(extra_scans=0):
    """A progressive JPEG whose last scan is repeated extra_scans more times: each repetition makes
    the decoder walk the whole image again."""
    def write(path):
        buffer = io.BytesIO()
        Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), np.uint8)).save(
            buffer, "JPEG", progressive=True)
        data = buffer.getvalue()
        last_scan = data[data.rfind(b"\xff\xda"): data.rfind(b"\xff\xd9")]
        path.write_bytes(data[: data.rfind(b"\xff\xd9")] + last_scan * extra_scans + b"\xff\xd9")
    return write


FIX = "fix or remove the file"
SHRINK = "shrink it below 89 megapixels"
TOO_LARGE = "more than Pillow's limit of 89,478,485 (a decompression bomb, or a picture too large)"
# name -> (file name, write(path), the problem the line names, the advice it gives): the line is
# "<path>: <problem> (<advice>)"; {pillow} stands for Pillow's own words, which its versions word differently.
BAD_FILES = {
    "not an image": ("notes.jpg", lambda p: p.write_text("car, truck, cat\n"),
                     "cannot decode image: not a JPEG, PNG, WebP, BMP or GIF file", FIX),
    "another format under a .jpg name": ("scan.jpg", tiff_named_jpg,
                                         "cannot decode image: not a JPEG, PNG, WebP, BMP or GIF file", FIX),
    "truncated JPEG": ("cut.jpg", truncated("JPEG"), "cannot decode image: truncated or corrupt ({pillow})", FIX),
    "truncated PNG": ("cut.png", truncated("PNG"), "cannot decode image: truncated or corrupt ({pillow})", FIX),
    "truncated WebP": ("cut.webp", truncated("WEBP"), "cannot decode image: truncated or corrupt ({pillow})", FIX),
    "zero bytes": ("empty.png", lambda p: p.write_bytes(b""), "empty file (0 bytes), not an image", FIX),
    "PNG bomb: 10^10 pixels declared in 60 bytes": (
        "bomb.png", lambda p: p.write_bytes(png_declaring(100_000, 100_000)),
        f"refused: it declares 10,000,000,000 pixels, {TOO_LARGE}", SHRINK),
    "PNG just over Pillow's limit (its warning is an error)": (
        "big.png", lambda p: p.write_bytes(png_declaring(10_000, 9_000)),
        f"refused: it declares 90,000,000 pixels, {TOO_LARGE}", SHRINK),
    "GIF bomb": ("bomb.gif", lambda p: p.write_bytes(gif_declaring(65535, 65535)),
                 f"refused: it declares 4,294,836,225 pixels, {TOO_LARGE}", SHRINK),
    "progressive JPEG repeating a scan 150 times": (
        "scans.jpg", progressive_jpeg(150),
        "refused: a JPEG of 160 scans (an encoder writes about 10; over 100 makes decoding take minutes)", FIX),
    "multi-picture JPEG repeating a scan 150 times": (
        "mpo.jpg", mpo_with_scans(150),
        "refused: a JPEG of 170 scans (an encoder writes about 10; over 100 makes decoding take minutes)", FIX),
    "run-length BMP declaring 20 megapixels": (
        "rle.bmp", lambda p: p.write_bytes(rle_bmp(5000, 4000)),
        "refused: a run-length BMP of 20,000,000 pixels (over 16,000,000 decodes slowly)", "save it as PNG or JPEG"),
    "PNG with 50 colour profiles": ("profiles.png", lambda p: p.write_bytes(png_with_profiles(50)),
                                    "refused: a PNG with more than one colour profile (iCCP chunk)", FIX),
    "FIFO": ("pipe.jpg", lambda p: os.mkfifo(p),
             "not a regular file (a pipe, socket or device), expected a photo file", FIX),
    "symlink loop": ("loop.jpg", lambda p: os.symlink(p.name, p),
                     "cannot open photo file (Too many levels of symbolic links)", FIX),
    "dangling symlink": ("gone.jpg", lambda p: os.symlink("nowhere.jpg", p), "no such photo file", FIX),
}


def bad_line(case, path, form="{path}: {problem} ({advice})"):
    """The whole line a bad file gives, as a pattern: form filled in with its path, problem and advice
    (BAD_FILES), every character as written but Pillow's own words."""
    _, _, problem, advice = BAD_FILES[case]
    text = form.format(path=path, problem=problem, advice=advice)
    return re.compile(re.escape(text).replace(re.escape("{pillow}"), r"[^()]+(\(\d+ bytes not processed\))?"))


def write_bad(folder, case):
    name, write = BAD_FILES[case][:2]
    path = folder / name
    write(path)
    return path


@pytest.mark.parametrize("case", list(BAD_FILES))
def test_bad_file_is_refused_in_one_line_naming_it(case, tmp_path):
    path = write_bad(tmp_path, case)
    with pytest.raises(BadImageFile) as info:
        load_image(path)
    assert bad_line(case, path).fullmatch(str(info.value)), str(info.value)


@pytest.mark.parametrize("case", list(BAD_FILES))
def test_tester_refuses_a_bad_file_with_one_line(case, tmp_path):
    path = write_bad(tmp_path, case)
    good = tmp_path / "good.png"
    solid(RED).save(good)
    result = run_script("tester.py", "--checkpoint", PRETRAINED, "--images", good, path, "--out", tmp_path / "out", cwd=tmp_path, timeout=60,
                        memory=MEMORY_LIMIT)
    assert_one_error_line(result)
    line = bad_line(case, path, "tester.py: error: {path}: {problem} ({advice}, or pass --skip-bad to skip bad files)")
    assert line.fullmatch(result.stderr.strip()), result.stderr
    assert not (tmp_path / "out" / "predictions.json").exists()


def test_skip_bad_warns_per_file_and_ends_with_a_count(tmp_path):
    bad = [write_bad(tmp_path, case) for case in BAD_FILES]
    good = []
    for k, name in enumerate(("a.jpg", "b.png")):
        good.append(tmp_path / name)
        solid((40 * k, 100, 200)).save(good[-1])
    result = run_script("tester.py", "--checkpoint", PRETRAINED, "--images", good[0], *bad, good[1], "--skip-bad", "--out", tmp_path / "out",
                        cwd=tmp_path, timeout=120, memory=MEMORY_LIMIT)
    assert result.returncode == 0, result.stderr
    lines = result.stderr.strip().splitlines()
    assert "Traceback" not in result.stderr
    assert len(lines) == len(bad) + 1, result.stderr
    for case, path, line in zip(BAD_FILES, bad, lines):
        assert bad_line(case, path, "warning: {path}: {problem}; skipped").fullmatch(line), line
    assert lines[-1] == f"warning: skipped {len(bad)} of {len(bad) + 2} files (bad images, each named above)"
    report = json.loads((tmp_path / "out" / "predictions.json").read_text())
    assert [p["path"] for p in report["predictions"]] == [str(g) for g in good]
    assert [s["path"] for s in report["skipped"]] == [str(b) for b in bad]


def test_all_files_bad_is_one_error(tmp_path):
    bad = [write_bad(tmp_path, case) for case in ("zero bytes", "not an image")]
    result = run_script("tester.py", "--checkpoint", PRETRAINED, "--images", *bad, "--skip-bad", "--out", tmp_path / "out", cwd=tmp_path,
                        timeout=60)
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1] == (
        "tester.py: error: none of the 2 image files could be read (each is named above); nothing to do")


# ---------------------------------------------------------------------------
# --data FOLDER: class subfolders, scored exactly like a pickle


def class_tree(root, sizes=(("Car", 5), ("automobile", 3), ("TRUCK", 4), ("cat", 6)), seed=0):
    """Class subfolders of random 32x32 photos (PNG and JPEG); returns {path: (label, course tensor)}
    decoded the plain way (PIL, convert("RGB"), (x/255 - 0.5) / 0.5), as dataset.py build does."""
    rng = np.random.default_rng(seed)
    reference = {}
    for name, n in sizes:
        folder = root / name
        folder.mkdir(parents=True)
        for j in range(n):
            path = folder / f"{j:03d}.{'jpg' if j % 2 else 'png'}"
            Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(path)
            plain = torch.from_numpy(np.asarray(Image.open(path).convert("RGB")).copy()).permute(2, 0, 1)
            reference[path] = (CLASS_FOLDERS[name.lower()], from_unit(plain.float() / 255))
    return reference


def test_folder_loader_matches_the_plain_decoding(tmp_path):
    reference = class_tree(tmp_path / "photos")
    images, labels, paths, skipped = load_image_folder(tmp_path / "photos")
    assert skipped == [] and sorted(paths) == sorted(reference)
    # Class order (car, truck, cat); within a class, subfolders then files by name.
    assert labels.tolist() == [0] * 8 + [1] * 4 + [2] * 6
    for image, label, path in zip(images, labels, paths):
        assert int(label) == reference[path][0]
        assert torch.equal(image, reference[path][1]), path  # bit for bit: 32x32 images are not resampled


@pytest.fixture
def random_checkpoint(tmp_path):
    torch.manual_seed(3)
    path = tmp_path / "random.ckpt"
    models.SimpleModel().save(path)
    return path


def metrics_of(tmp_path, checkpoint, data, out):
    result = run_script("tester.py", "--checkpoint", checkpoint, "--data", data, "--out", out, cwd=tmp_path,
                        timeout=120)
    assert result.returncode == 0, result.stderr
    record = json.loads((out / f"metrics_{checkpoint.stem}.json").read_text())
    for key in ("data", "skipped"):
        record.pop(key, None)
    # A mistake's index is its place in the set (and a folder's also names its file): the places
    # differ between a folder and a pickle of the same images, the mistakes do not.
    record["mistakes"] = sorted((m["true"], m["predicted"], round(m["loss"], 5)) for m in record["mistakes"])
    return record, result


def test_folder_gives_the_same_metrics_as_the_equivalent_pickle(tmp_path, random_checkpoint):
    reference = class_tree(tmp_path / "photos")
    pickle_path = tmp_path / "photos.pickle"
    dataset.save_pickle(pickle_path, torch.stack([t for _, t in reference.values()]),
                        torch.tensor([label for label, _ in reference.values()]))
    from_pickle, _ = metrics_of(tmp_path, random_checkpoint, pickle_path, tmp_path / "a")
    from_folder, result = metrics_of(tmp_path, random_checkpoint, tmp_path / "photos", tmp_path / "b")
    assert from_folder == from_pickle and from_folder["n"] == 18
    assert "confusion matrix" in result.stdout
    assert (tmp_path / "b" / "confusion_random.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@needs_cifar
def test_cifar_photos_in_a_folder_score_as_the_pickle_built_from_them(tmp_path, random_checkpoint):
    # 60 real CIFAR-10 JPEGs per class in class folders (CIFAR's own names), against the
    # pickles `dataset.py build` makes from the same files, train and dev joined into one.
    source = cifar_dir() / "train"
    tree = tmp_path / "cifar" / "train"
    for name in dataset.CIFAR_NAMES:
        (tree / name).mkdir(parents=True)
        for path in sorted((source / name).iterdir())[:60]:
            shutil.copy(path, tree / name / path.name)
    dataset.build_from_cifar(tmp_path / "cifar", tmp_path / "data", train_counts=(30, 30, 30),
                             dev_counts=(30, 30, 30), mislabeled=0, quiet=True)
    parts = [dataset.load_pickle(tmp_path / "data" / f"{split}.pickle") for split in ("train", "dev")]
    dataset.save_pickle(tmp_path / "all.pickle", torch.cat([x for x, _ in parts]), torch.cat([y for _, y in parts]))
    from_pickle, _ = metrics_of(tmp_path, random_checkpoint, tmp_path / "all.pickle", tmp_path / "a")
    from_folder, _ = metrics_of(tmp_path, random_checkpoint, tree, tmp_path / "b")
    assert from_folder == from_pickle and from_folder["n"] == 180


def test_unknown_subfolders_and_loose_files_are_named_in_one_warning_line_each(tmp_path, random_checkpoint):
    class_tree(tmp_path / "photos", sizes=(("car", 2), ("Cat", 2)))
    (tmp_path / "photos" / "dog").mkdir()
    (tmp_path / "photos" / "horse").mkdir()
    solid(RED).save(tmp_path / "photos" / "loose.jpg")
    (tmp_path / "photos" / "car" / "notes.txt").write_text("taken in May\n")
    (tmp_path / "photos" / "car" / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")
    (tmp_path / "photos" / "car" / "2023").mkdir()
    result = run_script("tester.py", "--checkpoint", random_checkpoint, "--data", tmp_path / "photos",
                        "--out", tmp_path / "out", cwd=tmp_path, timeout=60)
    assert result.returncode == 0, result.stderr
    warnings = result.stderr.strip().splitlines()
    assert len(warnings) == 4 and all(line.startswith("warning: ") for line in warnings), result.stderr
    assert "dog/, horse/" in warnings[0] and "loose.jpg" in warnings[1] and "--images" in warnings[1]
    assert "notes.txt" in result.stderr and "2023/" in result.stderr and ".DS_Store" not in result.stderr
    record = json.loads((tmp_path / "out" / "metrics_random.json").read_text())
    assert record["n"] == 4 and record["skipped"] == []
    assert {k: v["support"] for k, v in record["per_class"].items()} == {"car": 2, "truck": 0, "cat": 2}


def folder_case(tmp_path, case):
    root = tmp_path / "photos"
    root.mkdir()
    if case == "only unknown subfolders":
        for name in ("dog", "horse"):
            (root / name).mkdir()
            solid(RED).save(root / name / "a.png")
    elif case == "no images in the class folders":
        (root / "car").mkdir()
        (root / "car" / "notes.txt").write_text("x")
    elif case == "only loose images":
        solid(RED).save(root / "a.png")
    elif case == "class folder is a symlink loop":
        (root / "car").symlink_to("car")
    elif case == "class folder is a file":
        (root / "truck").write_text("x")
    return root


EXPECTED_CLASSES = "(expected class subfolders car/ (or automobile/), truck/ and cat/ holding images)"
# name -> the error line, {root} standing for the folder given
FOLDER_CASES = {
    "empty folder": f"{{root}}: the folder is empty {EXPECTED_CLASSES}",
    "only unknown subfolders": f"{{root}}: no class subfolder car/, automobile/, truck/ or cat/ (found dog/, horse/) "
                               f"{EXPECTED_CLASSES}",
    "no images in the class folders": "{root}: no image files in car/ (expected .jpg .jpeg .png .webp .bmp .gif files)",
    "only loose images": "{root}: no class subfolder car/, automobile/, truck/ or cat/ (found 1 file and no "
                         "subfolders) (sort the images into car/, truck/ and cat/ subfolders, or predict them with "
                         "--images {root})",
    "class folder is a symlink loop": "{root}/car: expected a class folder, but cannot open it (Too many levels of "
                                      "symbolic links) (make it a folder of images)",
    "class folder is a file": "{root}/truck: expected a class folder, but a file, not a folder (make it a folder of "
                              "images)",
}


@pytest.mark.parametrize("case", list(FOLDER_CASES))
def test_folder_without_usable_class_subfolders_is_one_error_line(case, tmp_path, random_checkpoint):
    root = folder_case(tmp_path, case)
    result = run_script("tester.py", "--checkpoint", random_checkpoint, "--data", root, "--out", tmp_path / "out",
                        cwd=tmp_path, timeout=60)
    lines = result.stderr.strip().splitlines()
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert lines[-1] == "tester.py: error: " + FOLDER_CASES[case].replace("{root}", str(root)), result.stderr
    assert all(line.startswith("warning: ") for line in lines[:-1]), result.stderr


def test_unreadable_folder_is_one_line(tmp_path, monkeypatch):
    # Root reads any folder, so the permission error is simulated where the listing happens.
    root = folder_case(tmp_path, "only loose images")
    real_scandir = os.scandir

    def scandir(path):
        if Path(path) == root:
            raise PermissionError(13, "Permission denied", str(path))
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", scandir)
    for load in (load_image_folder, lambda folder: load_image_files([folder])):
        with pytest.raises(UserError) as info:
            load(root)
        assert str(info.value) == f"{root}: cannot list the folder (Permission denied)"


# ---------------------------------------------------------------------------
# --images: a prediction per file, in input order


def mixed_formats(folder):
    folder.mkdir()
    paths = []
    for k, (name, kwargs) in enumerate((("phone.jpg", {"quality": 90}), ("drawing.png", {}),
                                        ("web.webp", {"quality": 80}), ("old.bmp", {}), ("anim.gif", {}))):
        paths.append(folder / name)
        strips(320 + 40 * k, 240).save(paths[-1], **kwargs)
    more = folder / "more"
    more.mkdir()
    for name in ("b.png", "a.jpg"):
        quadrants().save(more / name)
    (more / "readme.txt").write_text("x")
    return paths, [more / "a.jpg", more / "b.png"], more


@pytest.mark.parametrize("tta", ["none", "flip"])
def test_images_on_mixed_formats_predicts_each_in_input_order(tta, tmp_path, random_checkpoint):
    files, folder_files, more = mixed_formats(tmp_path / "in")
    args = ["--images", files[2], more, *files[:2], *files[3:], "--out", tmp_path / "out"]
    result = run_script("tester.py", "--checkpoint", random_checkpoint, *args, "--tta", tta, cwd=tmp_path,
                        timeout=120)
    assert result.returncode == 0, result.stderr
    order = [files[2], *folder_files, *files[:2], *files[3:]]
    report = json.loads((tmp_path / "out" / "predictions.json").read_text())
    assert report["tta"] == tta and report["n"] == 7 and report["skipped"] == []
    assert [p["path"] for p in report["predictions"]] == [str(p) for p in order]

    # The oracle is written here: the softmax, with flip its mean with the mirror image's.
    images = torch.stack([load_image(p) for p in order])
    expected = softmax_by_hand(models.load_model(random_checkpoint), images, flip=tta == "flip")
    for record, probs in zip(report["predictions"], expected.tolist()):
        assert [record["probabilities"][c] for c in dataset.CLASSES] == pytest.approx(probs, abs=2e-6)
        assert record["predicted"] == dataset.CLASSES[int(np.argmax(probs))]
        assert record["probability"] == pytest.approx(max(probs), abs=2e-6)

    table = [line for line in result.stdout.splitlines() if line.startswith(str(tmp_path))]
    assert [line.split()[0] for line in table] == [str(p) for p in order]
    assert ("flip (averaged with the mirrored image" in result.stdout) == (tta == "flip")
    assert "readme.txt" in result.stderr  # the one warning line: a file in the folder that is not an image
    assert (tmp_path / "out" / "predictions.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_file_names_that_are_not_utf8_are_shown_escaped_and_others_as_they_are(tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    solid(RED).save(folder / "x.png")
    os.rename(folder / "x.png", os.fsencode(folder) + b"/caf\xe9.png")  # Latin-1 bytes, as old cameras wrote
    solid(BLUE).save(folder / "ünïcode 猫.png")
    result = run_script("tester.py", "--checkpoint", PRETRAINED, "--images", folder, "--out", tmp_path / "out",
                        cwd=tmp_path, timeout=60)
    assert result.returncode == 0 and result.stderr == "", result.stderr
    report = json.loads((tmp_path / "out" / "predictions.json").read_text())
    assert [p["path"] for p in report["predictions"]] == [f"{folder}/caf\\xe9.png", f"{folder}/ünïcode 猫.png"]
    assert f"{folder}/caf\\xe9.png" in result.stdout


def test_images_folder_with_only_class_subfolders_points_to_data(tmp_path):
    class_tree(tmp_path / "photos", sizes=(("car", 1),))
    result = run_script("tester.py", "--checkpoint", PRETRAINED, "--images", tmp_path / "photos", "--out", tmp_path / "out", cwd=tmp_path,
                        timeout=60)
    assert_one_error_line(result)
    folder = tmp_path / "photos"
    assert result.stderr.strip() == (f"tester.py: error: {folder}: no image files directly inside this folder (it has "
                                     f"class subfolders: evaluate them with --data {folder})")


@pytest.mark.parametrize("args,line", [
    (["--images", "a.jpg", "--data", "b"], "argument --data: not allowed with argument --images (see --help)"),
    (["--skip-bad", "--data", "dev.pickle"],
     "--skip-bad applies to image files (--data FOLDER or --images), not to the data pickle dev.pickle"),
    (["--images"], "argument --images: expected at least one argument (see --help)"),
])
def test_flag_mistakes_are_one_line(args, line, tmp_path, random_checkpoint):
    result = run_script("tester.py", "--checkpoint", random_checkpoint, *args, "--out", tmp_path / "out",
                        cwd=tmp_path, timeout=60)
    assert_one_error_line(result)
    assert result.stderr.strip() == f"tester.py: error: {line}"


def test_an_image_given_as_data_points_to_images(tmp_path, random_checkpoint):
    solid(RED).save(tmp_path / "cat.jpg")
    result = run_script("tester.py", "--checkpoint", random_checkpoint, "--data", tmp_path / "cat.jpg",
                        "--out", tmp_path / "out", cwd=tmp_path, timeout=60)
    path = tmp_path / "cat.jpg"
    assert_one_error_line(result)
    assert result.stderr.strip() == (f"tester.py: error: {path}: an image file, not a course data pickle (predict it "
                                     f"with --images {path}, or pass --data a folder with car/, truck/ and cat/ "
                                     "subfolders)")


# ---------------------------------------------------------------------------
# The same loader elsewhere: adversarialExample.py --data FOLDER, dataset.py build


def test_adversarial_example_attacks_a_photo_folder(tmp_path, random_checkpoint):
    class_tree(tmp_path / "photos", sizes=(("car", 4), ("truck", 4), ("cat", 4)))
    write_bad(tmp_path / "photos" / "cat", "truncated PNG")
    result = run_script("adversarialExample.py", "--checkpoint", random_checkpoint, "--data", tmp_path / "photos",
                        "--skip-bad", "--epsilons", "0", "0.05", "--examples", "1", "--device", "cpu",
                        "--out", tmp_path / "out", cwd=tmp_path, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stderr.strip().splitlines()[-1] == "warning: skipped 1 of 13 files (bad images, each named above)"
    report = json.loads((tmp_path / "out" / "adversarial.json").read_text())
    assert report["dev_images"] == 12 and report["skipped"][0]["path"].endswith("cut.png")
    assert report["results"]["fgsm"][0]["accuracy_attacked"] == 1.0
    assert all(Path(e["file"]).parent.parent == tmp_path / "photos" for e in report["examples"])


@pytest.mark.parametrize("case", ["FIFO", "PNG bomb: 10^10 pixels declared in 60 bytes", "symlink loop"])
def test_cifar_tree_build_refuses_bad_files_in_one_line(case, tmp_path):
    # dataset.py build reads a CIFAR-10 image tree through the same decoder: no hang, no blow-up.
    tree = tmp_path / "cifar" / "train"
    for name in dataset.CIFAR_NAMES:
        (tree / name).mkdir(parents=True)
        for j in range(1 if name == "truck" else 2):
            solid(RED, size=(32, 32)).save(tree / name / f"{j:04d}.png")
    bad = tree / "truck" / f"0009{Path(BAD_FILES[case][0]).suffix}"  # every image is used: this one too
    BAD_FILES[case][1](bad)
    result = run_script("dataset.py", "build", "--cifar-dir", tmp_path / "cifar", "--out-dir", tmp_path / "data",
                        "--train-counts", 1, 1, 1, "--dev-counts", 1, 1, 1, "--mislabeled", 0, cwd=tmp_path,
                        timeout=60, memory=MEMORY_LIMIT)
    lines = result.stderr.strip().splitlines()
    assert result.returncode != 0 and "Traceback" not in result.stderr
    # The advice fits a CIFAR-10 copy (a picture too large is still to be shrunk).
    advice = "{advice}" if BAD_FILES[case][3] == SHRINK else "replace it, or use another CIFAR-10 copy"
    assert bad_line(case, bad, "dataset.py: error: {path}: {problem} (" + advice + ")").fullmatch(lines[-1]), lines[-1]
    assert not (tmp_path / "data" / "train.pickle").exists()
