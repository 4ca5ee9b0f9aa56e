"""Reading files that may come from anyone: no code runs, nothing runs away, nothing hangs.

Every data pickle, checkpoint, resume state and image file crosses this boundary:

* read_input_file: regular files only (a FIFO or /dev/zero would block or never end);
* data pickles, CIFAR-10 batches and legacy (non-zip) checkpoints through the restricted
  unpickler of restricted_pickle.py, each allowed only the globals its kind of file needs
  (pickled_data.py, pickled_tensors.py), within a Budget of the file's size;
* zip checkpoints and resume states: stored entries only, claimed sizes within the file,
  checksums valid, data.pkl through the restricted unpickler (storages as meta tensors), then
  torch.load(weights_only=True) on the same bytes, on a torch without known bypasses of it
  (cli.require_safe_torch);
* checkpoint contents: a state_dict of finite, plain tensors that fits the model.

What a file means (the course's list of (image, label), where a checkpoint keeps its weights,
a resume state) is checked by the module named for it (dataset.py, models.py, resume_state.py);
this one guarantees that reading it is safe.
"""
import io
import os
import pickle
import pickletools
import re
import stat
import warnings
import zipfile
from pathlib import Path

import torch

from cli import MissingFile, UserError, clip, describe, one_line, require_safe_torch, whole
from pickled_data import PickledArray, data_pickle_globals, numpy_globals
from pickled_tensors import (NotTorchFormat, check_zip_pickle, checkpoint_globals, looks_like_a_module,
                             read_legacy_torch)
from restricted_pickle import Budget, MalformedPickle, RestrictedUnpickler, UnknownGlobal, UnsafeFile

ZIP_MAGIC = b"PK\x03\x04"
COURSE_FORM = "a pickle.dump of a list of (image, label) tuples"


def read_input_file(path, what, hint=""):
    """The bytes of a regular file, or one UserError line saying why not.

    Folders, FIFOs and devices are refused: reading a FIFO blocks until a writer appears,
    and /dev/zero never ends. The type is checked on the opened descriptor (opened
    non-blocking), so the file cannot be swapped for a FIFO between the check and the read.
    """
    path = Path(path)
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0))
    except FileNotFoundError:
        raise MissingFile(f"{path}: no such {what} file{hint}", path) from None
    except IsADirectoryError:
        raise UserError(f"{path}: is a folder, expected a {what} file") from None
    except OSError as e:
        raise UserError(f"{path}: cannot open {what} file ({e.strerror})") from None
    try:
        mode = os.fstat(fd).st_mode
        if stat.S_ISDIR(mode):
            raise UserError(f"{path}: is a folder, expected a {what} file")
        if not stat.S_ISREG(mode):
            raise UserError(f"{path}: not a regular file (a pipe, socket or device), expected a {what} file")
        with os.fdopen(fd, "rb", closefd=False) as f:
            return f.read()
    except OSError as e:
        raise UserError(f"{path}: cannot read {what} file ({e.strerror})") from None
    finally:
        os.close(fd)


# The first byte of a pickle: PROTO (protocols 2 to 5, as pickle.dump and torch.save write), or any
# instruction of protocols 0 and 1, which have no header.
_FIRST_BYTES = {op.code.encode("latin1")[0] for op in pickletools.opcodes if op.proto <= 1}


def _starts_as_pickle(data):
    if data[:1] == b"\x80":
        return data[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05")
    return bool(data) and data[0] in _FIRST_BYTES


def _text_start(data):
    """The first characters of data when it reads as text (UTF-8, printable or whitespace), else None."""
    head = data[:256]
    for cut in range(4):  # the last character may be cut in the middle
        try:
            text = head[: len(head) - cut].decode("utf-8")
            break
        except UnicodeDecodeError:
            continue
    else:
        return None
    return text if text and all(c.isprintable() or c in "\n\r\t" for c in text) else None


def _not_a_pickle(data, path, what, form):
    """The one line for a file that is no pickle of the kind wanted (empty, text, other bytes), or None."""
    if not data:
        return UserError(f"{path}: empty file (0 bytes), not a {what} ({form})")
    text = _text_start(data)
    if text is not None:
        return UserError(f"{path}: not a {what} ({form}): it holds text, starting {describe(text)}")
    if not _starts_as_pickle(data):
        return UserError(f"{path}: not a {what} ({form}): it does not start as a pickle does (its first bytes are "
                         f"{data[:8]!r})")
    return None


def _unpickle(data, allowed_within, path, what, form, encoding="ASCII"):
    """The object in data through the restricted unpickler, allowed the globals allowed_within(budget)
    gives, within a Budget of the file's size; every way a file can fail is one UserError line. form: what
    such a file is, for a file that is not one."""
    if not _starts_as_pickle(data):
        raise _not_a_pickle(data, path, what, form)
    budget = Budget(len(data), what)
    try:
        return RestrictedUnpickler(io.BytesIO(data), allowed_within(budget), budget, encoding=encoding).load()
    except UnsafeFile as e:
        raise UserError(f"{path}: refused: {e}") from None
    except RecursionError:
        raise UserError(f"{path}: refused: nested too deeply for a {what}") from None
    except Exception as e:  # a broken file can fail inside unpickling in many ways
        if isinstance(e, EOFError) or "exhausted" in str(e):  # a read past the end, or a frame cut short
            raise UserError(f"{path}: truncated {what}: the file ends before its pickle does; write or copy it "
                            "again") from None
        if _text_start(data) is not None:  # text that starts with a pickle instruction ('c', '(', 'I', ...)
            raise _not_a_pickle(data, path, what, form) from None
        detail = str(e) if isinstance(e, MalformedPickle) else f"{type(e).__name__}: {one_line(e)}"
        raise UserError(f"{path}: not a {what} ({form}), or a damaged one ({detail})") from None


def read_pickle(path, what, hint=""):
    """The object in a pickle.dump() of course data, loaded without running code from it.

    What it makes the loader do and hold stays bounded by the file's size (restricted_pickle.Budget,
    docs/untrusted_files.md). numpy arrays come back as PickledArray (.array),
    a pickled MyDataset as PickledDataset (.the_list). Returns (object, the file's size in bytes).
    """
    data = read_input_file(path, what, hint)
    if data[:4] == ZIP_MAGIC:
        raise UserError(f"{path}: a torch.save() zip archive, not a course {what} pickle ({COURSE_FORM})")
    return _unpickle(data, data_pickle_globals, path, f"course {what} pickle", COURSE_FORM), len(data)


# ---------------------------------------------------------------------------
# CIFAR-10's python batches: pickled dicts of numpy arrays


def read_cifar_batch(path):
    """One of CIFAR-10's python batches (data_batch_1, ...): (pixels uint8 [N, 3072], labels [N] ints 0-9).

    The batches are pickled dicts of numpy arrays. pickle.load (as torchvision uses it) would
    let such a file call anything; here only numpy's array and dtype constructors are
    resolved, by stand-ins that accept plain arrays whose bytes match their shape.
    """
    data = read_input_file(path, "CIFAR-10 batch")
    batch = _unpickle(data, numpy_globals, path, "CIFAR-10 batch", "a pickled dict with data and labels",
                      encoding="bytes")
    if not isinstance(batch, dict):
        raise UserError(f"{path}: not a CIFAR-10 batch (a pickled dict with data and labels), found {describe(batch)}")
    batch = {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in batch.items()}
    pixels, labels = batch.get("data"), batch.get("labels")
    pixels = pixels.array if isinstance(pixels, PickledArray) else None
    if pixels is None or pixels.dtype.name != "uint8" or pixels.ndim != 2 or pixels.shape[1] != 3 * 32 * 32:
        raise UserError(f"{path}: a CIFAR-10 batch's data must be a uint8 array [N, 3072]")
    if not (isinstance(labels, list) and len(labels) == len(pixels)
            and all(whole(label) and 0 <= label <= 9 for label in labels)):
        raise UserError(f"{path}: a CIFAR-10 batch's labels must be a list of {len(pixels):,} ints from 0 to 9")
    return pixels, labels


# ---------------------------------------------------------------------------
# Checkpoints and other torch.save() files


def _checked_zip(data, path, what):
    """The archive torch.load may read: the entries of data, checked, written anew.

    torch.save stores entries uncompressed; a compressed entry could inflate without bound
    (a zip bomb), and a CRC mismatch means bytes changed after saving (corruption that would
    otherwise load as garbage weights). data.pkl passes the restricted unpickler. torch's zip
    reader is not Python's: it takes the folder from the first entry, finds names without
    regard to case, and reads the central directory's offsets as written where Python's
    allows for bytes prepended to the archive, so one file can hold two archives, one for
    each. torch.load therefore reads a copy made of exactly the entries checked here.
    """
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as archive:
            entries = archive.infolist()
            folder = entries[0].filename.split("/")[0] + "/" if entries else ""
            names = [e.filename for e in entries]
            if len({n.lower() for n in names}) != len(names):
                raise UserError(f"{path}: refused: two entries of the same name; torch.save writes each once")
            if not entries or not all(n.startswith(folder) for n in names) or folder + "data.pkl" not in names:
                raise UserError(f"{path}: not a readable PyTorch checkpoint (not the layout torch.save writes: "
                                "one folder holding data.pkl)")
            # Bit 0: encrypted, bit 5: compressed patched data; torch.save sets neither.
            flagged = [e.filename for e in entries if e.flag_bits & 0x21]
            if flagged:
                raise UserError(f"{path}: refused: entry {clip(flagged[0])} is encrypted or patched; torch.save "
                                "writes neither")
            compressed = [e.filename for e in entries if e.compress_type != zipfile.ZIP_STORED]
            if compressed:
                raise UserError(f"{path}: refused: compressed entries ({clip(compressed[0])}); torch.save never "
                                "compresses, and a compressed entry could expand without bound")
            total = sum(e.file_size for e in entries)
            if total > len(data):
                raise UserError(f"{path}: refused: its entries claim {total:,} bytes but the file holds "
                                f"{len(data):,}")
            copy = io.BytesIO()
            with zipfile.ZipFile(copy, "w", zipfile.ZIP_STORED) as rebuilt:
                for entry in entries:  # each read once; reading checks its checksum
                    try:
                        content = archive.read(entry)
                    except zipfile.BadZipFile:
                        raise UserError(f"{path}: corrupted: the checksum of {entry.filename} does not match its "
                                        "data") from None
                    rebuilt.writestr(entry.filename, content)
                    if entry.filename == folder + "data.pkl":
                        pickled = content
    except (zipfile.BadZipFile, RuntimeError, NotImplementedError, ValueError, UnicodeError, EOFError) as e:
        if str(e) == "File is not a zip file":  # zipfile found no directory at the end: the file was cut short
            raise UserError(f"{path}: truncated {what}: it starts as the zip archive torch.save writes, but the "
                            "archive's end is missing; copy or save it again") from None
        raise UserError(f"{path}: not a readable PyTorch checkpoint (broken zip archive: {one_line(e)})") from None
    sizes = {e.filename: e.file_size for e in entries}
    try:
        check_zip_pickle(pickled, lambda key: sizes.get(f"{folder}data/{key}"), what, len(data))
    except UnsafeFile as e:
        raise _refusal(e, path, pickled) from None
    except RecursionError:
        raise UserError(f"{path}: refused: nested too deeply for a {what}") from None
    except Exception as e:  # a broken pickle fails in many ways; all mean the same
        raise UserError(f"{path}: not a readable PyTorch checkpoint (broken pickle: {type(e).__name__})") from None
    return copy.getvalue()


def _refusal(error, path, pickled):
    """The one line for an UnsafeFile from a torch.save() file's pickle; for a whole pickled model
    (torch.save(model, path), a common habit), what to save instead."""
    if isinstance(error, UnknownGlobal) and looks_like_a_module(pickled):
        return UserError(f"{path}: refused: it holds a whole pickled model ({clip(error.module)}.{clip(error.name)}), "
                         "and loading one runs its code; save the weights instead, with "
                         "torch.save(model.state_dict(), path) in the code that made it")
    return UserError(f"{path}: refused: {error}")


# What the pickle instructions the restricted reader lets through but torch's weights-only loader refuses hold.
_OPCODE_MEANING = {"LONG4": ": a whole number of more than 255 bytes"}


def _torch_load(data, path, what):
    """torch.load(weights_only=True) on a checked zip checkpoint, with torch's errors in one line.

    Gated here as well as at every script's start, so that the course API (SimpleModel().load)
    never trusts an old torch's loader either.
    """
    require_safe_torch()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the one-line error below already says what went wrong
            return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if "weights only" in str(e).lower() or "unsupported global" in str(e).lower():
            # torch's message advises weights_only=False; keep only what its unpickler refused.
            refused = re.search(r"WeightsUnpickler error:\s*(.+)", str(e))
            detail = f" ({clip(refused[1].strip(), 60)})" if refused else ""
            operand = re.search(r"Unsupported operand (\d+)", str(e))
            opcode = pickletools.code2op.get(chr(int(operand[1])) if operand and int(operand[1]) < 256 else "")
            if opcode is not None:
                detail = f" (the pickle instruction {opcode.name}{_OPCODE_MEANING.get(opcode.name, '')})"
            raise UserError(f"{path}: refused: torch's weights-only loader does not read what this {what} "
                            f"holds{detail}") from None
        raise UserError(f"{path}: not a readable PyTorch checkpoint (broken pickle)") from None
    except Exception as e:  # torch raises many types for corrupt files
        raise UserError(f"{path}: not a readable PyTorch checkpoint ({one_line(e)})") from None


def _load_zip(data, path, what):
    """The object in a torch.save() zip archive's bytes: the archive checked, then loaded weights-only."""
    return _torch_load(_checked_zip(data, path, what), path, what)


def read_torch_file(path, what):
    """The object in a torch.save() zip file, loaded weights-only within the zip checks above."""
    data = read_input_file(path, what)
    if not data:
        raise UserError(f"{path}: empty file (0 bytes), not a {what} written by torch.save")
    if data[:4] != ZIP_MAGIC:
        raise UserError(f"{path}: not a {what} written by torch.save")
    return _load_zip(data, path, what)


def read_checkpoint(path):
    """The object in a checkpoint file (zip, as torch >= 1.6 writes it, or legacy serialization), loaded
    without running code from it. Where it keeps the weights is models.py's to find."""
    data = read_input_file(path, "checkpoint")
    if data[:4] == ZIP_MAGIC:
        return _load_zip(data, path, "checkpoint")
    if not data:
        raise UserError(f"{path}: empty file (0 bytes), not a PyTorch checkpoint")
    budget = Budget(len(data), "checkpoint")
    try:
        return read_legacy_torch(data, checkpoint_globals(budget), "checkpoint", budget)
    except NotTorchFormat:
        text = _text_start(data)
        if text is not None:
            raise UserError(f"{path}: not a PyTorch checkpoint: it holds text, starting {describe(text)}") from None
        if data[:1] == b"\x80" and _starts_as_pickle(data):  # PROTO: what pickle.dump writes first
            raise UserError(f"{path}: not a PyTorch checkpoint: a pickle, but not in torch.save's format (save the "
                            "weights with torch.save(model.state_dict(), path))") from None
        raise UserError(f"{path}: not a PyTorch checkpoint") from None
    except UnsafeFile as e:
        raise _refusal(e, path, data) from None
    except Exception as e:  # broken bytes fail inside unpickling in many ways
        raise UserError(f"{path}: not a readable PyTorch checkpoint ({type(e).__name__})") from None


def _describe_mismatch(model, state):
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    shapes = [
        f"{k} {list(state[k].shape)} != {list(v.shape)}"
        for k, v in expected.items()
        if k in state and state[k].shape != v.shape
    ]
    parts = []
    for label, keys in (("missing keys", missing), ("unexpected keys", unexpected), ("mis-shaped", shapes)):
        if keys:
            shown = ", ".join(map(clip, keys[:4])) + (f" (+{len(keys) - 4} more)" if len(keys) > 4 else "")
            parts.append(f"{label}: {shown}")
    return "; ".join(parts)


# What a weight may be: the floating types a model trains in (float8 has no NaN check, and
# one of them counts NaN as finite).
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def tensor_problem(value):
    """Why a tensor from a file cannot be used as plain numbers (sparse, meta, float8, NaN or infinite),
    or None."""
    if value.layout != torch.strided or value.is_meta or value.is_quantized:
        return f"is not a plain dense tensor ({value.layout}, {value.device})"
    if value.is_floating_point() and value.dtype not in FLOAT_DTYPES:
        return f"has dtype {value.dtype}, not one a model trains in ({', '.join(map(str, FLOAT_DTYPES))})"
    if value.is_floating_point() and not torch.isfinite(value).all():
        return "holds NaN or infinite values"
    return None


def check_state_dict(model, state, where, what="checkpoint"):
    """Refuse a state_dict that does not fit model or holds non-finite or wrongly typed values; what: the kind
    of file it comes from."""
    if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                              for k, v in state.items()):
        raise UserError(f"{where}: expected a state_dict (names and tensors), found {describe(state)}")
    mismatch = _describe_mismatch(model, state)
    if mismatch:
        raise UserError(f"{where}: not a {type(model).__name__} checkpoint: {mismatch}")
    for key, expected in model.state_dict().items():
        value = state[key]
        if expected.is_floating_point() != value.is_floating_point() or value.is_complex() or value.dtype == torch.bool:
            raise UserError(f"{where}: tensor {key} has dtype {value.dtype}, expected "
                            f"{'floating point' if expected.is_floating_point() else expected.dtype}")
        problem = tensor_problem(value)
        if problem:
            advice = f": the {what} is corrupted or comes from a diverged run" if "NaN" in problem else ""
            raise UserError(f"{where}: tensor {key} {problem}{advice}")
