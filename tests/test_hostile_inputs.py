"""A hostile-input sweep: malicious and malformed files, bad flags, unwritable outputs, faults.

Every case has one expected outcome: refused with one `error:` line (non-zero exit, no
traceback), or accepted. File cases are loaded in one child process per kind, CLI cases run
the real scripts; every child runs under an address-space limit, so a bomb that got through
would fail its case instead of taking the machine down.
"""
import codecs
import collections
import hashlib
import io
import json
import os
import pickle
import re
import resource
import shutil
import signal
import struct
import subprocess
import sys
import time
import zipfile
import zlib

import numpy as np
import pytest
import torch

from conftest import ROOT, needs_cifar, reaped, run_script

PRETRAINED = ROOT / "checkpoints" / "pre_trained.ckpt"
MEMORY_LIMIT = 6 * 2**30  # bytes of address space per child: importing torch needs about 3 GiB
LEGACY_MAGIC, LEGACY_PROTOCOL = 0x1950A86A20F9469CFC6C, 1001


def limited(memory=MEMORY_LIMIT, file_size=None):
    def apply():
        resource.setrlimit(resource.RLIMIT_AS, (memory, memory))
        if file_size is not None:
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG
            resource.setrlimit(resource.RLIMIT_FSIZE, (file_size, file_size))
    return apply


def run(script, *args, cwd, timeout=120, file_size=None):
    return run_script(script, *args, cwd=cwd, timeout=timeout, memory=MEMORY_LIMIT, file_size=file_size)


def assert_refused(result, *needles):
    lines = result.stderr.strip().splitlines()
    assert result.returncode not in (0, None), result.stderr
    assert "Traceback" not in result.stderr and "weights_only=False" not in result.stderr, result.stderr
    error_lines = [line for line in lines if ": error: " in line]
    assert len(error_lines) == 1 and error_lines[0] == lines[-1], result.stderr
    assert all(n in lines[-1] for n in needles), result.stderr


def assert_one_line(result, *needles):
    assert_refused(result, *needles)
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr


# ---------------------------------------------------------------------------
# Crafting hostile files


class Call:
    """Pickles as the call func(*args): how an attacker makes a pickle run anything."""

    def __init__(self, func, *args):
        self.func, self.args = func, args

    def __reduce__(self):
        return (self.func, self.args)


def legacy_blob(raw, numel, count=None, kind="FloatStorage", location="cpu", trailing=b""):
    """Bytes in torch's legacy serialization of one storage, with any declaration we like."""
    out = io.BytesIO()
    for obj in (LEGACY_MAGIC, LEGACY_PROTOCOL,
                {"protocol_version": LEGACY_PROTOCOL, "little_endian": True,
                 "type_sizes": {"short": 2, "int": 4, "long": 4}}):
        pickle.dump(obj, out, protocol=2)
    marker = object()

    class StoragePickler(pickle.Pickler):
        def persistent_id(self, obj):
            return ("storage", getattr(torch, kind), "0", location, numel, None) if obj is marker else None

    StoragePickler(out, protocol=2).dump(marker)
    pickle.dump(["0"], out, protocol=2)
    out.write(struct.pack("<q", numel if count is None else count) + raw + trailing)
    return out.getvalue()


def image_bytes(value=0.0):
    return torch.full((3 * 32 * 32,), value).numpy().tobytes()


# What the accepted files hold, as numpy arrays: each accepted case writes some of these, and what the
# loader gives must hash as they do (Loads), computed here from the arrays, not by any loader.
SOURCE = np.random.default_rng(0).uniform(-1, 1, (4, 3, 32, 32)).astype(np.float32)
SOURCE_LABELS = [0, 1, 2, 0]
SOURCE64 = np.random.default_rng(1).uniform(-1, 1, (1, 3, 32, 32))  # float64, rounded to float32 on loading


def content_digest(images, labels):
    """SHA-256 of a data set as the loader returns it: images float32 [N, 3, 32, 32] in C order, then labels int64."""
    digest = hashlib.sha256(np.ascontiguousarray(images, np.float32).tobytes())
    digest.update(np.asarray(labels, np.int64).tobytes())
    return digest.hexdigest()


class Loads:
    """An accepted data file: it loads, as these images and labels."""

    def __init__(self, images, labels):
        self.images, self.labels = np.asarray(images).reshape(-1, 3, 32, 32).astype(np.float32), list(labels)

    def outcome(self):
        return f"ok {len(self.labels)} images sha256 {content_digest(self.images, self.labels)}"


def weights_digest(state):
    """SHA-256 of a state_dict: each name, then its tensor's float32 bytes, in order of the names."""
    digest = hashlib.sha256()
    for name in sorted(state):
        digest.update(name.encode() + b"\0" + state[name].detach().float().contiguous().numpy().tobytes())
    return digest.hexdigest()


class LoadsWeights:
    """An accepted checkpoint: it loads, as the weights of the shipped checkpoint (torch.load reads them here)."""

    def outcome(self):
        return f"ok sha256 {weights_digest(base_state())}"


def source_image(i):
    """A crafted tensor holding SOURCE[i], laid out as torch writes one."""
    return crafted_tensor(legacy_blob(SOURCE[i].tobytes(), 3072))


def crafted_tensor(blob, offset=0, size=(3, 32, 32), stride=(1024, 32, 1), requires_grad=False):
    storage = Call(torch.storage._load_from_bytes, blob)
    return Call(torch._utils._rebuild_tensor_v2, storage, offset, size, stride, requires_grad,
                collections.OrderedDict())


def dump(path, obj, protocol=2):
    with open(path, "wb") as f:
        pickle.dump(obj, f, protocol=protocol)
    return path


class Raw(bytes):
    """File content given as bytes, not as an object to pickle."""


def one_image_rebuilt(n):
    """Many tensors rebuilt from one shared storage: a few bytes of pickle each."""
    storage = Call(torch.storage._load_from_bytes, legacy_blob(image_bytes(), 3072))
    size, stride = (3, 32, 32), (1024, 32, 1)
    return [(Call(torch._utils._rebuild_tensor_v2, storage, 0, size, stride, False, collections.OrderedDict()), 0)
            for _ in range(n)]


def payload_in_storage_bytes(marker):
    inner = io.BytesIO()
    torch.save(Call(os.system, f"touch {marker}"), inner, _use_new_zipfile_serialization=False)
    return [(Call(torch.storage._load_from_bytes, inner.getvalue()), 0)]


def zipped(obj):
    out = io.BytesIO()
    torch.save(obj, out)
    return Raw(out.getvalue())


def truncated_pickle():
    full = pickle.dumps([(torch.zeros(3, 32, 32), i % 3) for i in range(4)], protocol=5)
    return Raw(full[: len(full) // 2])


def label_as_raw(raw_label):
    """A one-item data pickle whose label is the given pickle opcodes (what pickle.dump cannot write)."""
    placeholder = 123456789
    data = pickle.dumps([(torch.zeros(3, 32, 32), placeholder)], protocol=2)
    encoded = b"J" + struct.pack("<i", placeholder)
    assert data.count(encoded) == 1
    return Raw(data.replace(encoded, raw_label))


GOOD = [(torch.tensor(SOURCE[i]), SOURCE_LABELS[i]) for i in range(4)]
ALL_SOURCE = Loads(SOURCE, SOURCE_LABELS)


class CallThenSetState(Call):
    """Pickles as func(*args) followed by BUILD with state: setting an object's state."""

    def __init__(self, func, args, state):
        super().__init__(func, *args)
        self.state = state

    def __reduce__(self):
        return (self.func, self.args, self.state)


UNBUILT_ARRAY = b"cnumpy.core.multiarray\n_reconstruct\ncnumpy\nndarray\nK\x00\x85C\x01b\x87R"


class MyDataset:
    """A student's own MyDataset: pickled as test_hostile_inputs.MyDataset."""

    def __init__(self, the_list, transform=None):
        self.the_list, self.transform = the_list, transform


class OtherDataset(MyDataset):
    pass


def course_dataset(items, transform=None):
    import dataset

    return dataset.MyDataset(items, transform)


def oversized_array():
    data = pickle.dumps([(np.zeros((3, 32, 32), np.float32), 0)], protocol=2)
    return Raw(data.replace(b"K\x03K K \x87", b"K\x03M\x00\x10K \x87"))  # shape (3, 4096, 32)
SHARED = torch.zeros(3, 32, 32)

# name -> (expected, content(marker): object to pickle or Raw bytes). Expected: Loads(what it holds) for a file
# accepted, else the refusal's whole line, {path} standing for the file's path.
# 10**5000 as pickle's LONG4 opcode: a number with 5,000 digits in 2,082 bytes.
HUGE_LONG4 = b"\x8b" + struct.pack("<i", 2077) + (10**5000).to_bytes(2077, "little")

DATA_CASES = {
    "valid, protocol 2": (ALL_SOURCE, lambda m: GOOD),
    "valid, protocol 5": (ALL_SOURCE, lambda m: GOOD),  # written with protocol 5 below
    "valid, crafted like torch writes it": (Loads(SOURCE[1], [1]), lambda m: [(source_image(1), 1)]),
    "valid, 0-d integer tensor labels": (Loads(SOURCE[0], [2]), lambda m: [(torch.tensor(SOURCE[0]), torch.tensor(2))]),
    "storage declared on the meta device": (Loads(SOURCE[2], [0]), lambda m: [
        (crafted_tensor(legacy_blob(SOURCE[2].tobytes(), 3072, location="meta")), 0)]),
    # Code execution
    "os.system at top level": (
        "{path}: refused: it refers to posix.system, which a course data pickle never holds (loading it could run "
        "code)", lambda m: Call(os.system, f"touch {m}")),
    "os.system inside an item": (
        "{path}: refused: it refers to posix.system, which a course data pickle never holds (loading it could run "
        "code)", lambda m: GOOD[:2] + [(Call(os.system, f"touch {m}"), 0)]),
    "os.system inside storage bytes": (
        "{path}: refused: it refers to posix.system, which a pickled storage never holds (loading it could run "
        "code)", payload_in_storage_bytes),
    "builtins.eval": (
        "{path}: refused: it refers to __builtin__.eval, which a course data pickle never holds (loading it could "
        "run code)", lambda m: [(Call(eval, "1+1"), 0)]),
    # What course code writes besides the format itself (issue: course drop-in, round two)
    "numpy image": (Loads(SOURCE[:2], [0, 2]), lambda m: [(SOURCE[0], 0), (SOURCE[1], 2)]),
    "numpy image, protocol 5": (Loads(SOURCE[:2], [0, 2]), lambda m: [(SOURCE[0], 0), (SOURCE[1], 2)]),
    "batch-of-one image [1, 3, 32, 32]": (Loads(SOURCE[3], [1]), lambda m: [(torch.tensor(SOURCE[3:4]), 1)]),
    "numpy int64 label": (Loads(SOURCE[0], [2]), lambda m: [(torch.tensor(SOURCE[0]), np.int64(2))]),
    "numpy 0-d array label": (Loads(SOURCE[0], [1]), lambda m: [(torch.tensor(SOURCE[0]), np.array(1))]),
    "pickled dataset.MyDataset": (ALL_SOURCE, lambda m: course_dataset(GOOD)),
    "pickled MyDataset of the student's own": (ALL_SOURCE, lambda m: MyDataset(GOOD)),
    "MyDataset holding a transform": (
        "{path}: refused: a MyDataset holds a transform (code); save it with transform=None",
        lambda m: course_dataset(GOOD, transform=1)),
    "MyDataset holding code as its transform": (
        "{path}: refused: it refers to posix.system, which a course data pickle never holds (loading it could run "
        "code)",
        lambda m: course_dataset(
            GOOD, transform=Call(os.system, f"touch {m}"))),
    "another class": (
        "{path}: refused: it refers to test_hostile_inputs.OtherDataset, which a course data pickle never holds "
        "(loading it could run code)", lambda m: OtherDataset(GOOD)),
    "numpy float64 image (read as float32)": (Loads(SOURCE64, [0]), lambda m: [(SOURCE64[0], 0)]),
    "numpy object array image": (
        "{path}: refused: an array has dtype 'O8', not a plain number type",
        lambda m: [(np.array([None, 1], dtype=object), 0)]),
    "numpy array claiming more than its bytes": (
        "{path}: refused: an array of shape [3, 4096, 32] holds 12,288 bytes, not 1,572,864",
        lambda m: oversized_array()),
    "numpy scalar label 2.0": (
        "{path}: item 0: label 2.0 (float) is not an int 0 (car), 1 (truck) or 2 (cat)",
        lambda m: [(torch.zeros(3, 32, 32), np.float64(2.0))]),
    "torch.save zip instead of a pickle": (
        "{path}: a torch.save() zip archive, not a course data pickle (a pickle.dump of a list of (image, label) "
        "tuples)", lambda m: zipped(GOOD)),
    # Resource bombs
    "nested hex codec expansion": (
        "{path}: refused: it encodes str data with codec 'hex'",
        lambda m: [(crafted_tensor(
            Call(codecs.encode, Call(codecs.encode, "ab" * 500, "hex"), "hex")), 0)]),
    "storage claims 2**34 elements": (
        "{path}: refused: its storages claim 68,719,476,736 bytes but the pickled storage holding them is only "
        "12,518 bytes", lambda m: [(crafted_tensor(legacy_blob(image_bytes(), 2**34)), 0)]),
    "storage count disagrees with its declaration": (
        "{path}: refused: storage 0 declares 3,072 elements but its data says 1,099,511,627,776",
        lambda m: [(crafted_tensor(legacy_blob(image_bytes(), 3072, count=2**40)), 0)]),
    "storage data truncated": (
        "{path}: refused: its storages claim 12,288 bytes but the pickled storage holding them is only 326 bytes",
        lambda m: [(crafted_tensor(legacy_blob(image_bytes()[:100], 3072)), 0)]),
    "tensor reaching past its storage": (
        "{path}: refused: a tensor of size [3, 32, 32] reaches element 3,171 of a storage of 3,072 elements",
        lambda m: [(crafted_tensor(legacy_blob(image_bytes(), 3072), offset=100), 0)]),
    "tensor with a huge size": (
        "{path}: refused: a tensor of size [3, 32, 1099511627776] reaches element 1,099,511,627,808 of a storage of "
        "3,072 elements",
        lambda m: [(crafted_tensor(
            legacy_blob(image_bytes(), 3072), size=(3, 32, 2**40), stride=(1, 1, 1)), 0)]),
    "tensor with a negative stride": (
        "{path}: refused: a tensor has an invalid layout (offset 0, size [3, 32, 32], stride [1024, 32, -1]): at "
        "most 8 dimensions, each number whole, from 0 to 2**62",
        lambda m: [(crafted_tensor(
            legacy_blob(image_bytes(), 3072), stride=(1024, 32, -1)), 0)]),
    "one image referenced 200,000 times": (
        "{path}: refused: it holds more pickle instructions than a course data pickle of its size may run (32,768: "
        "one per 32 bytes of the file, at least 32,768)", lambda m: [(SHARED, 0)] * 200_000),
    "one storage rebuilt 100,000 times": (
        "{path}: refused: it holds more pickle instructions than a course data pickle of its size may run (128,504: "
        "one per 32 bytes of the file, at least 32,768)", lambda m: one_image_rebuilt(100_000)),
    "BINBYTES8 declaring a terabyte": (
        "{path}: truncated course data pickle: the file ends before its pickle does; write or copy it again",
        lambda m: Raw(b"\x80\x04\x8e" + struct.pack("<Q", 2**40))),
    "deeply nested lists": (
        "{path}: refused: it holds more pickle instructions than a course data pickle of its size may run (32,768: "
        "one per 32 bytes of the file, at least 32,768)",
        lambda m: Raw(b"\x80\x02" + b"]" * 50_000 + b"a" * 49_999 + b".")),
    # Silent garbage the course format does not allow
    "image requires grad": (
        "{path}: item 0: image has requires_grad=True (autograd state); expected a plain tensor",
        lambda m: [(crafted_tensor(
            legacy_blob(image_bytes(), 3072), requires_grad=True), 0)]),
    "bool label tensor(True)": (
        "{path}: item 0: label is a torch.bool tensor of shape [], expected an int 0 (car), 1 (truck) or 2 (cat)",
        lambda m: [(torch.zeros(3, 32, 32), torch.tensor(True))]),
    "bool label True": (
        "{path}: item 0: label True (bool) is not an int 0 (car), 1 (truck) or 2 (cat)",
        lambda m: [(torch.zeros(3, 32, 32), True)]),
    "1-d label tensor": (Loads(SOURCE[2], [1]), lambda m: [(torch.tensor(SOURCE[2]), torch.tensor([1]))]),
    "2-element label tensor": (
        "{path}: item 0: label is a torch.int64 tensor of shape [2], expected an int 0 (car), 1 (truck) or 2 (cat)",
        lambda m: [(torch.zeros(3, 32, 32), torch.tensor([1, 2]))]),
    "huge int label": (
        "{path}: item 0: label 1267650600228229401496703205376 (int) is not an int 0 (car), 1 (truck) or 2 (cat)",
        lambda m: [(torch.zeros(3, 32, 32), 2**100)]),
    "label 10**5000": (
        "{path}: item 0: label a number of about 5,000 digits (int) is not an int 0 (car), 1 (truck) or 2 (cat)",
        lambda m: [(torch.zeros(3, 32, 32), 10**5000)]),
    "label nested 200,000 lists deep": (
        "{path}: refused: it holds more pickle instructions than a course data pickle of its size may run (32,768: "
        "one per 32 bytes of the file, at least 32,768)", lambda m: label_as_raw(b"]" * 200_000 + b"a" * 199_999)),
    "label a megabyte string": (
        "{path}: item 0: label 'xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx... (1,048,576 characters)' (str) is not an "
        "int 0 (car), 1 (truck) or 2 (cat)", lambda m: [(torch.zeros(3, 32, 32), "x" * 2**20)]),
    "label nested 1,000 lists deep": (
        "{path}: item 0: label a list of 1 item (list) is not an int 0 (car), 1 (truck) or 2 (cat)",
        lambda m: label_as_raw(b"]" * 1_000 + b"a" * 999)),
    # Found by review: what Python's C unpickler or BUILD let a few bytes do
    "memo index 2**30 (the C unpickler grew its memo to it)": (
        "{path}: expected a list of (image, label) tuples, found NoneType",
        lambda m: Raw(b"\x80\x02Nr" + struct.pack("<I", 2**30) + b".")),
    "a million one-byte opcodes (empty dicts)": (
        "{path}: refused: it holds more pickle instructions than a course data pickle of its size may run (32,768: "
        "one per 32 bytes of the file, at least 32,768)", lambda m: Raw(b"\x80\x04" + b"}0" * 500_000 + b"N.")),
    "BUILD resizing a tensor's storage": (
        "{path}: refused: it sets the state of a torch.float32 tensor of shape [1], which a course data pickle "
        "never does",
        lambda m: [(CallThenSetState(
            torch._utils._rebuild_tensor_v2, (Call(torch.storage._load_from_bytes, legacy_blob(image_bytes()[:4], 1)), 0,
                                              (1,), (1,), False, collections.OrderedDict()), (None, 0, (3, 32, 32), (1024, 32, 1))), 0)]),
    "a numpy array that never gets its data": (
        "{path}: item 0: refused: an array has no data (its state was never set)",
        lambda m: Raw(
            b"\x80\x02]" + UNBUILT_ARRAY + b"K\x00\x86a.")),
    "a MyDataset that never gets its list": (
        "{path}: refused: a MyDataset has no the_list (its state was never set)",
        lambda m: Raw(
            b"\x80\x02cdataset\nMyDataset\n)\x81.")),
    "a set of ints": (
        "{path}: refused: it builds a set, which a course data pickle never holds",
        lambda m: Raw(pickle.dumps([(torch.zeros(3, 32, 32), 0), {1, 2}], protocol=4))),
    "dict keys sharing one hash": (
        "{path}: refused: a dict has the key 2305843009213693951; a course data pickle uses names and small numbers",
        lambda m: Raw(same_hash_keys(1000))),
    "OrderedDict built from a list of items": (
        "{path}: refused: it builds an OrderedDict from a list of items, which torch.save never does",
        lambda m: [
            (torch.zeros(3, 32, 32), 0), Call(collections.OrderedDict, [(1, 2)])]),
    "dict key that is a float": (
        "{path}: refused: a dict has the key 0.5; a course data pickle uses names and small numbers",
        lambda m: [(torch.zeros(3, 32, 32), 0), {0.5: 1}]),
    "items set on a list": (
        "{path}: refused: it sets items of a list of 0 items, which a course data pickle never does",
        lambda m: Raw(b"\x80\x02]K\x00K\x01s.")),
    "protocol-0 memo slot of 40 digits": (
        "{path}: refused: it stores an object in memo slot a number of about 40 digits",
        lambda m: Raw(b"(lp" + b"9" * 40 + b"\n.")),
    "BYTEARRAY8 declaring 64 GiB in 10 bytes": (
        "{path}: refused: a byte array declares 68,719,476,736 bytes but the course data pickle has only 1 left",
        lambda m: Raw(
            b"\x80\x05\x96" + struct.pack("<Q", 2**36) + b".")),
    "tensor stride of 5,000 digits": (
        "{path}: refused: a tensor has an invalid layout (offset 0, size [3, a number of about 5,000 digits, 1], "
        "stride [1024, a number of about 5,000 digits, 1]): at most 8 dimensions, each number whole, from 0 to "
        "2**62",
        lambda m: [(crafted_tensor(
            legacy_blob(image_bytes(), 3072), size=(3, 10**5000, 1), stride=(1024, 10**5000, 1)), 0)]),
    "numpy array with a dimension of 5,000 digits": (
        "{path}: refused: an array has an invalid shape [3, 2, a number of about 5,000 digits]: at most 8 "
        "dimensions, each a whole number from 0 to 2**62",
        lambda m: Raw(
            pickle.dumps([(np.zeros((3, 2, 7), np.float32), 0)], protocol=2).replace(
                b"K\x02K\x07", b"K\x02" + HUGE_LONG4, 1))),
    "float64 image (read as float32)": (Loads(SOURCE64, [2]), lambda m: [(torch.tensor(SOURCE64[0]), 2)]),
    "float16 image": (
        "{path}: item 0: image has dtype torch.float16, expected torch.float32 in [-1, 1]",
        lambda m: [(torch.zeros(3, 32, 32, dtype=torch.float16), 0)]),
    "NaN image": (
        "{path}: item 0: image holds NaN or infinite values", lambda m: [(torch.full((3, 32, 32), float("nan")), 0)]),
    "empty list": ("{path}: the data set is empty", lambda m: []),
    "a dict": ("{path}: expected a list of (image, label) tuples, found dict", lambda m: {"images": 1}),
    "zero bytes": (
        "{path}: empty file (0 bytes), not a course data pickle (a pickle.dump of a list of (image, label) tuples)",
        lambda m: Raw(b"")),
    "random bytes": (
        "{path}: not a course data pickle (a pickle.dump of a list of (image, label) tuples): it does not start as "
        "a pickle does (its first bytes are b'\\xc1Xk\\xd6H\\x03\\xf9B')",
        lambda m: Raw(np.random.default_rng(2).bytes(4096))),
    "a text file": (
        "{path}: not a course data pickle (a pickle.dump of a list of (image, label) tuples): it holds text, "
        "starting 'car,truck,cat\\n1,2,3\\n'", lambda m: Raw(b"car,truck,cat\n1,2,3\n")),
    "truncated in the middle": (
        "{path}: truncated course data pickle: the file ends before its pickle does; write or copy it again",
        lambda m: truncated_pickle()),
}


def write_data_case(d, name, marker):
    path = d / f"data {len(list(d.iterdir()))}.pickle"
    content = DATA_CASES[name][1](marker)
    if isinstance(content, Raw):
        path.write_bytes(content)
    else:
        dump(path, content, protocol=5 if "protocol 5" in name else 2)
    if "protocol 5" in name:
        assert b"_frombuffer" in path.read_bytes() or "numpy" not in name
    return path


def legacy_prefix():
    out = io.BytesIO()
    for obj in (LEGACY_MAGIC, LEGACY_PROTOCOL, {"protocol_version": LEGACY_PROTOCOL, "little_endian": True,
                                                "type_sizes": {"short": 2, "int": 4, "long": 4}}):
        pickle.dump(obj, out, protocol=2)
    return out.getvalue()


def zip_flags(bits, bad_name=False):
    """The shipped checkpoint with general-purpose flag bits set in its central directory."""
    data, i = bytearray(PRETRAINED.read_bytes()), 0
    while (i := data.find(b"PK\x01\x02", i)) >= 0:
        struct.pack_into("<H", data, i + 8, struct.unpack_from("<H", data, i + 8)[0] | bits)
        if bad_name:
            data[i + 46] = 0xFF
        i += 4
    return bytes(data)


# Python hashes k * (2**61 - 1) to 0 for every k: keys a file can choose so that each insertion
# walks all the keys before it.
SAME_HASH = 2**61 - 1


def same_hash_keys(n):
    """A pickle (protocol 2) of a dict whose n int keys all share one hash."""
    items = b"".join(b"\x8a\x0a" + (k * SAME_HASH).to_bytes(10, "little") + b"N" for k in range(1, n + 1))
    return b"\x80\x02}(" + items + b"u."


def zip_holding(pickled, records=(), first=None, data_pkl_twice=False):
    """A zip laid out as torch.save writes it (archive/data.pkl, byteorder, data/<key>) with the given
    data.pkl and storage records; first: an entry written before all others."""
    import warnings

    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as archive, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # zipfile warns of a duplicate name
        if first:
            archive.writestr(first, b"")
        archive.writestr("archive/data.pkl", pickled)
        if data_pkl_twice:
            archive.writestr("archive/data.pkl", pickle.dumps({}, protocol=2))
        archive.writestr("archive/byteorder", b"little")
        archive.writestr("archive/version", b"3\n")
        for key, data in records:
            archive.writestr(f"archive/data/{key}", data)
    return out.getvalue()


def shipped_pickle_and_records():
    with zipfile.ZipFile(PRETRAINED) as archive:
        names = archive.namelist()
        return (archive.read("archive/data.pkl"),
                [(n.split("/")[-1], archive.read(n)) for n in names if n.startswith("archive/data/")])


def two_archives_in_one(evil_pickle):
    """The shipped checkpoint, and before it a copy whose data.pkl is evil_pickle, laid out so that
    Python's zipfile (which allows for bytes prepended to an archive) reads the shipped one while a
    reader that takes the central directory's offset as written (torch's) reads the other."""
    def local(name, data):
        return struct.pack("<IHHHHHIIIHH", 0x04034B50, 20, 0, 0, 0, 0, zlib.crc32(data), len(data), len(data),
                           len(name), 0) + name + data

    def central(entries, offsets):
        return b"".join(struct.pack("<IHHHHHHIIIHHHHHII", 0x02014B50, 20, 20, 0, 0, 0, 0, zlib.crc32(data),
                                    len(data), len(data), len(name), 0, 0, 0, 0, 0, offset) + name
                        for (name, data), offset in zip(entries, offsets))

    def region(entries, base):
        out, offsets = b"", []
        for name, data in entries:
            offsets.append(base + len(out))
            out += local(name, data)
        return out, offsets

    with zipfile.ZipFile(PRETRAINED) as archive:
        benign = [(i.filename.encode(), archive.read(i)) for i in archive.infolist()]
    evil = [(name, evil_pickle if name.endswith(b"/data.pkl") else data) for name, data in benign]
    evil_local, evil_offsets = region(evil, 0)
    evil_local += b"\0" * max(0, sum(len(local(*entry)) for entry in benign) - len(evil_local))
    evil_cd = central(evil, evil_offsets)
    benign_base = len(evil_local) + len(evil_cd)
    benign_local, benign_offsets = region(benign, benign_base)
    shift = benign_base + len(benign_local) - len(evil_local)  # what zipfile adds to every offset
    benign_cd = central(benign, [o - shift for o in benign_offsets])
    end = struct.pack("<IHHHHIIH", 0x06054B50, 0, 0, len(benign), len(benign), len(benign_cd), len(evil_local), 0)
    return evil_local + evil_cd + benign_local + benign_cd + end


def with_short_record(key):
    pickled, records = shipped_pickle_and_records()
    return zip_holding(pickled, [(k, data[:100] if k == key else data) for k, data in records])


def state_dict_file(path, state, legacy=False):
    torch.save({"model_state_dict": state}, path, _use_new_zipfile_serialization=not legacy)
    return path


def base_state():
    return torch.load(PRETRAINED, weights_only=True)["model_state_dict"]


def with_tensor(key, make):
    state = base_state()
    state[key] = make(state[key])
    return state


class Shadowed(dict):
    """Pickles as an OrderedDict with instance attributes (items=5), which torch's weights-only loader sets
    on loading: attributes that take the place of the dict's methods."""

    def __init__(self, mapping, attributes):
        super().__init__(mapping)
        self.attributes = attributes

    def __reduce__(self):
        return (collections.OrderedDict, (), self.attributes, None, iter(dict(self).items()))


def shadowed(mapping, **attributes):
    return Shadowed(mapping, attributes)


def corrupted_middle(path):
    data = bytearray(PRETRAINED.read_bytes())
    middle = data.find(b"archive/data/4") + 2000  # inside fc1.weight's record
    data[middle : middle + 64] = bytes(64 - i for i in range(64))
    path.write_bytes(bytes(data))


def deflated(path):
    with zipfile.ZipFile(PRETRAINED) as src, zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as dst:
        for info in src.infolist():
            dst.writestr(info.filename, src.read(info))


def nan_row(t):
    return t.clone().index_fill_(0, torch.tensor([3]), float("nan"))


# name -> (expected, write(path, marker)); PRETRAINED itself is the "shipped" case. Expected: LoadsWeights() for a
# file accepted (the shipped weights, every one), else the refusal's whole line, {path} standing for the file's path.
CHECKPOINT_CASES = {
    "the shipped checkpoint": (LoadsWeights(), None),
    "legacy format": (LoadsWeights(), lambda p, m: state_dict_file(p, base_state(), legacy=True)),
    "bare state_dict": (LoadsWeights(), lambda p, m: torch.save(base_state(), p)),
    "NaN weights": (
        "{path}: tensor fc1.weight holds NaN or infinite values: the checkpoint is corrupted or comes from a "
        "diverged run", lambda p, m: state_dict_file(p, with_tensor("fc1.weight", nan_row))),
    "infinite weights": (
        "{path}: tensor conv2.bias holds NaN or infinite values: the checkpoint is corrupted or comes from a "
        "diverged run",
        lambda p, m: state_dict_file(
            p, with_tensor("conv2.bias", lambda t: torch.full_like(t, float("inf"))))),
    "NaN weights, legacy": (
        "{path}: tensor fc1.weight holds NaN or infinite values: the checkpoint is corrupted or comes from a "
        "diverged run",
        lambda p, m: state_dict_file(
            p, with_tensor("fc1.weight", nan_row), legacy=True)),
    "integer weights": (
        "{path}: tensor fc3.weight has dtype torch.int64, expected floating point",
        lambda p, m: state_dict_file(
            p, with_tensor("fc3.weight", lambda t: t.long()))),
    "corrupted middle": (
        "{path}: corrupted: the checksum of archive/data/4 does not match its data", lambda p, m: corrupted_middle(p)),
    "compressed entries": (
        "{path}: refused: compressed entries (archive/data.pkl); torch.save never compresses, and a compressed "
        "entry could expand without bound", lambda p, m: deflated(p)),
    "os.system payload (zip)": (
        "{path}: refused: it refers to posix.system, which a checkpoint never holds (loading it could run code)",
        lambda p, m: torch.save(Call(os.system, f"touch {m}"), p)),
    "os.system payload (legacy)": (
        "{path}: refused: it refers to posix.system, which a checkpoint never holds (loading it could run code)",
        lambda p, m: torch.save(
            Call(os.system, f"touch {m}"), p, _use_new_zipfile_serialization=False)),
    "legacy storage claims 64 GiB": (
        "{path}: refused: its storages claim 68,719,476,736 bytes but the checkpoint holding them is only 294 bytes",
        lambda p, m: p.write_bytes(legacy_blob(b"\0" * 64, 2**34))),
    "truncated": (
        "{path}: truncated checkpoint: it starts as the zip archive torch.save writes, but the archive's end is "
        "missing; copy or save it again", lambda p, m: p.write_bytes(PRETRAINED.read_bytes()[:50_000])),
    "zero bytes": ("{path}: empty file (0 bytes), not a PyTorch checkpoint", lambda p, m: p.write_bytes(b"")),
    "random bytes": (
        "{path}: not a PyTorch checkpoint", lambda p, m: p.write_bytes(np.random.default_rng(3).bytes(5000))),
    "a data pickle as checkpoint": (
        "{path}: not a PyTorch checkpoint: a pickle, but not in torch.save's format (save the weights with "
        "torch.save(model.state_dict(), path))", lambda p, m: dump(p, GOOD)),
    "arch that is not a name": (
        "{path}: unknown architecture 123 (known: simple, resnet8, whitened)",
        lambda p, m: torch.save(
            {"model_state_dict": base_state(), "arch": 123}, p)),
    "arch of 5,000 digits": (
        "{path}: refused: torch's weights-only loader does not read what this checkpoint holds (the pickle "
        "instruction LONG4: a whole number of more than 255 bytes)",
        lambda p, m: torch.save({"model_state_dict": base_state(), "arch": 10**5000}, p)),
    "arch of 5,000 digits, legacy": (
        "{path}: unknown architecture a number of about 5,000 digits (known: simple, resnet8, whitened)",
        lambda p, m: torch.save(
            {"model_state_dict": base_state(), "arch": 10**5000}, p, _use_new_zipfile_serialization=False)),
    "legacy format holding Parameters": (LoadsWeights(), lambda p, m: state_dict_file(
        p, {k: torch.nn.Parameter(v) for k, v in base_state().items()}, legacy=True)),
    "legacy file setting the state of torch.FloatStorage": (
        "{path}: refused: it sets the state of a torch storage type, which a checkpoint never does",
        lambda p, m: p.write_bytes(
            legacy_prefix() + b"\x80\x02ctorch\nFloatStorage\n}X\x05\x00\x00\x00dtypeK\x05sb." + pickle.dumps([], protocol=2))),
    "zip entry flagged encrypted": (
        "{path}: refused: entry archive/data.pkl is encrypted or patched; torch.save writes neither",
        lambda p, m: p.write_bytes(zip_flags(0x1))),
    "zip entry flagged patched": (
        "{path}: refused: entry archive/data.pkl is encrypted or patched; torch.save writes neither",
        lambda p, m: p.write_bytes(zip_flags(0x20))),
    "zip entry name not UTF-8": (
        "{path}: not a readable PyTorch checkpoint (broken zip archive: 'utf-8' codec can't decode byte 0xff in "
        "position 0: invalid start byte)", lambda p, m: p.write_bytes(zip_flags(0x800, bad_name=True))),
    "legacy Parameter with a hook": (
        "{path}: refused: a parameter carries autograd hooks or Python attributes",
        lambda p, m: state_dict_file(
            p, {**base_state(), "fc3.bias": Call(torch._utils._rebuild_parameter, base_state()["fc3.bias"], True,
                                                  collections.OrderedDict([(1, 2)]))},
            legacy=True)),
    "legacy OrderedDict given an items attribute": (
        "{path}: refused: it sets attributes of a dict other than a state_dict's _metadata",
        lambda p, m: p.write_bytes(
            legacy_prefix() + b"\x80\x02ccollections\nOrderedDict\n)R}X\x05\x00\x00\x00itemsK\x01sb."
            + pickle.dumps([], protocol=2))),
    "zip state_dict whose items method is shadowed": (
        "{path}: refused: it sets attributes of a dict other than a state_dict's _metadata",
        lambda p, m: torch.save(
            {"model_state_dict": shadowed(base_state(), items=5)}, p)),
    "another network's weights": (
        "{path}: not a SimpleModel checkpoint: missing keys: conv1.weight, conv1.bias, conv2.weight, conv2.bias (+6 "
        "more); unexpected keys: w", lambda p, m: torch.save({"model_state_dict": {"w": torch.zeros(2)}}, p)),
    # torch.load(weights_only=True) reads what follows without limit: each is refused before it runs.
    "zip dict of 3,000 keys sharing one hash": (
        "{path}: refused: a dict has the key 2305843009213693951; a checkpoint uses names and small numbers",
        lambda p, m: p.write_bytes(
            zip_holding(same_hash_keys(3000)))),
    "zip pickle decoding hex": (
        "{path}: refused: it encodes str data with codec 'hex'",
        lambda p, m: p.write_bytes(zip_holding(pickle.dumps(
            Call(codecs.encode, "00" * 1000, "hex"), protocol=2)))),
    "zip pickle of a million empty sets": (
        "{path}: refused: it builds a set, which a checkpoint never holds",
        lambda p, m: p.write_bytes(zip_holding(
            b"\x80\x04" + b"\x8f" * 2**20 + b"."))),
    "zip pickle of a million empty dicts": (
        "{path}: refused: it holds more pickle instructions than a checkpoint of its size may run (262,144: one per "
        "32 bytes of the file, at least 262,144)",
        lambda p, m: p.write_bytes(zip_holding(
            b"\x80\x04" + b"}" * 2**20 + b"."))),
    "float8 weights": (
        "{path}: refused: it refers to torch._utils._rebuild_tensor_v3, which a checkpoint never holds",
        lambda p, m: state_dict_file(
            p, with_tensor("fc1.weight", lambda t: t.to(torch.float8_e4m3fn)))),
    "zip with data.pkl twice": (
        "{path}: refused: two entries of the same name; torch.save writes each once",
        lambda p, m: p.write_bytes(zip_holding(
            pickle.dumps({}, protocol=2), data_pkl_twice=True))),
    "zip whose first entry is in another folder": (
        "{path}: not a readable PyTorch checkpoint (not the layout torch.save writes: one folder holding data.pkl)",
        lambda p, m: p.write_bytes(
            zip_holding(pickle.dumps({}, protocol=2), first="other/data.pkl"))),
    "zip storage record shorter than declared": (
        "{path}: refused: storage 0 declares 1,200 torch.float32 elements but its record holds 100 bytes",
        lambda p, m: p.write_bytes(with_short_record("0"))),
    "zip storage record missing": (
        "{path}: refused: storage 0 declares 1,200 torch.float32 elements but its record holds no bytes",
        lambda p, m: p.write_bytes(zip_holding(shipped_pickle_and_records()[0]))),
    "zip as written by torch.save, rebuilt": (LoadsWeights(), lambda p, m: p.write_bytes(zip_holding(
        *shipped_pickle_and_records()))),
    # torch.load reads a copy of the entries checked, never the file's second archive (a set here).
    "zip hiding a second archive for torch's reader": (LoadsWeights(), lambda p, m: p.write_bytes(two_archives_in_one(
        pickle.dumps({1, 2, 3}, protocol=2)))),
    "zip OrderedDict built from a list of items": (
        "{path}: refused: it builds an OrderedDict from a list of items, which torch.save never does",
        lambda p, m: (
            p.write_bytes(zip_holding(pickle.dumps(Call(collections.OrderedDict, [(1, 2)]), protocol=2))))),
}


def write_checkpoint_case(d, name, marker):
    write = CHECKPOINT_CASES[name][1]
    if write is None:
        return PRETRAINED
    path = d / f"ckpt {len(list(d.iterdir()))}.ckpt"
    write(path, marker)
    return path


# Each accepted file's content is hashed in the child: the images and labels of a data file, the weights of a
# checkpoint, as the test's own digests (content_digest, weights_digest) hash what the files were written from.
LOADER = """
import json, sys
from cli import UserError
from dataset import load_pickle
from models import load_model
from test_hostile_inputs import content_digest, weights_digest


def loaded(path):
    if sys.argv[1] == "data":
        images, labels = load_pickle(path)
        assert str(images.dtype) == "torch.float32" and str(labels.dtype) == "torch.int64", (images.dtype, labels.dtype)
        assert images.shape[1:] == (3, 32, 32) and labels.shape == (len(images),), (images.shape, labels.shape)
        return f"ok {len(labels)} images sha256 {content_digest(images.numpy(), labels.numpy())}"
    return f"ok sha256 {weights_digest(load_model(path).state_dict())}"


results = {}
for path in sys.argv[2:]:
    try:
        results[path] = loaded(path)
    except UserError as e:
        results[path] = "refused: " + str(e)
    except BaseException as e:
        results[path] = f"CRASH {type(e).__name__}: {e}"[:300]
print(json.dumps(results))
"""


def load_all(kind, files, tmp):
    result = subprocess.run([sys.executable, "-c", LOADER, kind, *(str(p) for p, _ in files.values())],
                            cwd=tmp, capture_output=True, text=True, timeout=600, preexec_fn=limited(),
                            env={**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests")])})
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout)


@pytest.fixture(scope="module")
def crafted(tmp_path_factory):
    d = tmp_path_factory.mktemp("hostile")
    marker = d.parent / f"{d.name}-MARKER"
    out = {"dir": d, "marker": marker}
    for kind, cases, write in (("data", DATA_CASES, write_data_case),
                               ("checkpoint", CHECKPOINT_CASES, write_checkpoint_case)):
        files = {name: (write(d, name, marker), cases[name][0]) for name in cases}
        out[kind] = (files, load_all(kind, files, d))
    return out


def the_message(expected, **values):
    """An expected message with its placeholders ({path}, {state}, ...) filled in: a string to match exactly, or
    for one holding what varies by machine (a score) a compiled pattern, its placeholders escaped."""
    if isinstance(expected, re.Pattern):
        pattern = expected.pattern
        for name, value in values.items():
            pattern = pattern.replace("{" + name + "}", re.escape(str(value)))
        return re.compile(pattern)
    for name, value in values.items():
        expected = expected.replace("{" + name + "}", str(value))
    return expected


def pattern(text, **parts):
    """text as a pattern matched whole: every character as written, but each {name} of parts a regular expression
    (what a machine computes: a score, a rate in floating point); other placeholders ({path}) kept for the_message."""
    escaped = re.sub(r"\\\{(\w+)\\\}", r"{\1}", re.escape(text))
    for name, regex in parts.items():
        escaped = escaped.replace("{" + name + "}", regex)
    return re.compile(escaped)


def assert_message(line, expected, prefix="", **values):
    """line is prefix and the expected message exactly (or matches prefix and its pattern whole)."""
    if isinstance(expected, re.Pattern):
        expected = re.compile(re.escape(prefix) + expected.pattern)
    else:
        expected = prefix + expected
    wanted = the_message(expected, **values)
    if isinstance(wanted, re.Pattern):
        assert wanted.fullmatch(line), f"{line!r} does not match {wanted.pattern!r}"
    else:
        assert line == wanted


def check_outcome(crafted, kind, case):
    files, results = crafted[kind]
    path, expected = files[case]
    outcome = results[str(path)]
    assert not crafted["marker"].exists(), "a payload ran"
    if isinstance(expected, (Loads, LoadsWeights)):  # accepted, with the content it was written with
        assert outcome == expected.outcome()
    else:
        assert outcome.startswith("refused: "), outcome
        message = outcome[len("refused: "):]
        assert_message(message, expected, path=path)
        assert "weights_only" not in message and len(message) < 500


@pytest.mark.parametrize("case", list(DATA_CASES))
def test_data_pickle(crafted, case):
    check_outcome(crafted, "data", case)


@pytest.mark.parametrize("case", list(CHECKPOINT_CASES))
def test_checkpoint(crafted, case):
    check_outcome(crafted, "checkpoint", case)


def test_legacy_checkpoint_loads_the_same_weights(tmp_path):
    from models import load_model

    base = torch.load(PRETRAINED, weights_only=True)["model_state_dict"]
    model = load_model(state_dict_file(tmp_path / "legacy.ckpt", base, legacy=True))
    assert all(torch.equal(model.state_dict()[k], v) for k, v in base.items())


# The CLI path: a sample of the files above through each script that reads them.


@pytest.mark.parametrize("case", ["storage claims 2**34 elements", "one image referenced 200,000 times",
                                  "os.system inside storage bytes", "torch.save zip instead of a pickle"])
def test_tester_refuses_hostile_data_in_one_line(crafted, case, tmp_path):
    path, expected = crafted["data"][0][case]
    result = run("tester.py", "--checkpoint", PRETRAINED, "--data", path, "--out", tmp_path / "out", cwd=tmp_path)
    assert_one_line(result)
    assert_message(result.stderr.strip(), expected, "tester.py: error: ", path=path)
    assert list(tmp_path.iterdir()) == [], "a refused run wrote files"


@pytest.mark.parametrize("script, args", [
    ("tester.py", ["--checkpoint", PRETRAINED, "--data", "notes.pickle"]),  # --out figures/ by default
    ("adversarialExample.py", ["--checkpoint", PRETRAINED, "--data", "notes.pickle"]),  # --out figures/
    ("trainer.py", ["--data", "notes.pickle", "--dev-data", "notes.pickle", "--fix-labels", "none"]),  # checkpoints/
])
def test_a_run_refused_for_its_data_makes_no_output_folder(script, args, tmp_path):
    (tmp_path / "notes.pickle").write_text("car,truck,cat\n")
    result = run(script, *args, cwd=tmp_path)
    assert_one_line(result)
    assert result.stderr == (f"{script}: error: notes.pickle: not a course data pickle (a pickle.dump of a list of "
                             "(image, label) tuples): it holds text, starting 'car,truck,cat\\n'\n")
    assert [p.name for p in tmp_path.iterdir()] == ["notes.pickle"], "a refused run made an output folder"


@pytest.mark.parametrize("script", ["tester.py", "adversarialExample.py"])
@pytest.mark.parametrize("case", ["NaN weights", "corrupted middle", "os.system payload (zip)"])
def test_scripts_refuse_hostile_checkpoints_in_one_line(crafted, script, case, tmp_path):
    path, expected = crafted["checkpoint"][0][case]
    result = run(script, "--checkpoint", path, "--data", crafted["data"][0]["valid, protocol 2"][0],
                 "--out", tmp_path / "out", cwd=tmp_path)
    assert_one_line(result)
    assert_message(result.stderr.strip(), expected, f"{script}: error: ", path=path)
    assert list(tmp_path.iterdir()) == [], "a refused run wrote files"
    assert not crafted["marker"].exists()


# ---------------------------------------------------------------------------
# Files that are not regular files: refused at once, never read (a FIFO would block forever)


@pytest.fixture
def fifo(tmp_path):
    path = tmp_path / "fifo"
    os.mkfifo(path)
    return path


# name -> (script, args, the kind of file the line names)
FIFO_CASES = {
    "tester --checkpoint": ("tester.py", ["--checkpoint", "FIFO"], "checkpoint"),
    "tester --data": ("tester.py", ["--checkpoint", PRETRAINED, "--data", "FIFO"], "data"),
    "adversarialExample --checkpoint": ("adversarialExample.py", ["--checkpoint", "FIFO"], "checkpoint"),
    "trainer --fix-labels": ("trainer.py", ["--fix-labels", "FIFO", "--out", "m.ckpt", "--figures", "fig"],
                             "label corrections"),
    "trainer --data": ("trainer.py", ["--data", "FIFO", "--dev-data", PRETRAINED, "--out", "m.ckpt",
                                      "--figures", "fig"], "data"),
}


@pytest.mark.parametrize("case", list(FIFO_CASES))
def test_fifo_inputs_are_refused_without_blocking(case, fifo, tmp_path):
    script, args, kind = FIFO_CASES[case]
    result = run(script, *[fifo if a == "FIFO" else a for a in args], cwd=tmp_path, timeout=60)
    assert_one_line(result)
    assert result.stderr == (f"{script}: error: {fifo}: not a regular file (a pipe, socket or device), expected a "
                             f"{kind} file\n")


def test_device_file_and_folder_are_refused(tmp_path):
    result = run("tester.py", "--checkpoint", "/dev/zero", cwd=tmp_path, timeout=60)
    assert_one_line(result)
    assert result.stderr == ("tester.py: error: /dev/zero: not a regular file (a pipe, socket or device), expected a "
                             "checkpoint file\n")
    # A folder is read as images sorted into class subfolders (tests/test_own_photos.py); this one has none, and
    # the run's own figures/ folder is not made before the data is read.
    (tmp_path / "photos").mkdir()
    result = run("tester.py", "--checkpoint", PRETRAINED, "--data", tmp_path / "photos", cwd=tmp_path, timeout=60)
    assert_one_line(result)
    assert result.stderr == (f"tester.py: error: {tmp_path / 'photos'}: the folder is empty (expected class "
                             "subfolders car/ (or automobile/), truck/ and cat/ holding images)\n")
    assert [p.name for p in tmp_path.iterdir()] == ["photos"]


# ---------------------------------------------------------------------------
# Flags: validated up front, one line naming the flag and the allowed range

FLAG_CASES = [
    ("trainer.py", ["--lr", "nan"],
     "trainer.py: error: argument --lr: expected a finite number in (0, inf), got nan (see --help)"),
    ("trainer.py", ["--lr", "-1"],
     "trainer.py: error: argument --lr: expected a finite number in (0, inf), got -1 (see --help)"),
    ("trainer.py", ["--lr", "inf"],
     "trainer.py: error: argument --lr: expected a finite number in (0, inf), got inf (see --help)"),
    ("trainer.py", ["--lr-sweep", "nan", "1e-3"],
     "trainer.py: error: argument --lr-sweep: expected a finite number in (0, inf), got nan (see --help)"),
    ("trainer.py", ["--lr-sweep", "1e-3", "inf"],
     "trainer.py: error: argument --lr-sweep: expected a finite number in (0, inf), got inf (see --help)"),
    ("trainer.py", ["--weight-decay", "-1"],
     "trainer.py: error: argument --weight-decay: expected a finite number in [0, 1], got -1 (see --help)"),
    ("trainer.py", ["--label-smoothing", "2"],
     "trainer.py: error: argument --label-smoothing: expected a finite number in [0, 1), got 2 (see --help)"),
    ("trainer.py", ["--label-smoothing", "-0.5"],
     "trainer.py: error: argument --label-smoothing: expected a finite number in [0, 1), got -0.5 (see --help)"),
    ("trainer.py", ["--repair-folds", "10000"],
     "trainer.py: error: argument --repair-folds: expected a whole number from 2 to 100, got 10000 (see --help)"),
    ("trainer.py", ["--repair-folds", "1"],
     "trainer.py: error: argument --repair-folds: expected a whole number from 2 to 100, got 1 (see --help)"),
    ("trainer.py", ["--seed", "-1"],
     "trainer.py: error: argument --seed: expected a whole number from 0 to 4294967295, got -1 (see --help)"),
    ("trainer.py", ["--seed", str(2**70)],
     "trainer.py: error: argument --seed: expected a whole number from 0 to 4294967295, got 1180591620717411303424 "
     "(see --help)"),
    ("trainer.py", ["--epochs", "0"],
     "trainer.py: error: argument --epochs: expected a whole number from 1 to 100000, got 0 (see --help)"),
    ("trainer.py", ["--epochs", "1.5"],
     "trainer.py: error: argument --epochs: expected a whole number from 1 to 100000, got '1.5' (see --help)"),
    ("trainer.py", ["--batch-size", "0"],
     "trainer.py: error: argument --batch-size: expected a whole number from 1 to 65536, got 0 (see --help)"),
    ("trainer.py", ["--sweep-steps", "-3"],
     "trainer.py: error: argument --sweep-steps: expected a whole number from 1 to 1000000, got -3 (see --help)"),
    ("trainer.py", ["--model", "vit"],
     "trainer.py: error: argument --model: invalid choice: 'vit' (choose from 'best', 'resnet8', 'simple', "
     "'whitened') (see --help)"),
    ("trainer.py", ["--device", "meta"],
     "trainer.py: error: --device 'meta': expected cpu, cuda, cuda:N, mps or auto"),
    ("trainer.py", ["--device", "mps"],
     "trainer.py: error: --device mps: torch sees no MPS device (Apple silicon with macOS 12.3 or newer); use "
     "--device cpu"),
    ("trainer.py", ["--device", "xpu"], "trainer.py: error: --device 'xpu': expected cpu, cuda, cuda:N, mps or auto"),
    ("trainer.py", ["--device", "cuda:7"],  # the line says what this machine has: no GPU, or fewer than 8
     re.compile(r"trainer\.py: error: --device cuda:7: (torch sees no CUDA GPU; use --device cpu|torch sees [1-7] "
                r"CUDA GPUs? \(cuda:0( to cuda:[1-6])?\); use (it|one of them) or --device cpu)")),
    ("trainer.py", ["--device", "cpu:1"],
     "trainer.py: error: --device 'cpu:1': expected cpu, cuda, cuda:N, mps or auto"),
    # Imbalance treatments and adversarial training
    ("trainer.py", ["--tau", "nan"],
     "trainer.py: error: argument --tau: expected a finite number in [0, 100], got nan (see --help)"),
    ("trainer.py", ["--tau", "-1"],
     "trainer.py: error: argument --tau: expected a finite number in [0, 100], got -1 (see --help)"),
    ("trainer.py", ["--drw-start", "-1"],
     "trainer.py: error: argument --drw-start: expected a whole number from 0 to 100000, got -1 (see --help)"),
    ("trainer.py", ["--drw-start", "61"],
     "trainer.py: error: --drw-start 61 is after the last epoch (60): the sampler would never switch on (see "
     "--help)"),
    ("trainer.py", ["--drw-start", "5", "--sampler", "none"],
     "trainer.py: error: --drw-start needs a --sampler to switch to (balanced or sqrt) (see --help)"),
    ("trainer.py", ["--mix", "cutout"],
     "trainer.py: error: argument --mix: invalid choice: 'cutout' (choose from 'none', 'mixup', 'cutmix') (see "
     "--help)"),
    ("trainer.py", ["--mix-alpha", "0"],
     "trainer.py: error: argument --mix-alpha: expected a finite number in (0, 100], got 0 (see --help)"),
    ("trainer.py", ["--mix-alpha", "inf"],
     "trainer.py: error: argument --mix-alpha: expected a finite number in (0, 100], got inf (see --help)"),
    ("trainer.py", ["--ema", "1"],
     "trainer.py: error: argument --ema: expected a finite number in [0, 1), got 1 (see --help)"),
    ("trainer.py", ["--ema", "nan"],
     "trainer.py: error: argument --ema: expected a finite number in [0, 1), got nan (see --help)"),
    ("trainer.py", ["--val-fraction", "0.5"],
     "trainer.py: error: argument --val-fraction: expected a finite number in [0, 0.5), got 0.5 (see --help)"),
    ("trainer.py", ["--select", "best-val"],
     "trainer.py: error: --select best-val needs a validation split (--val-fraction) (see --help)"),
    ("trainer.py", ["--loss", "focal"],
     "trainer.py: error: argument --loss: invalid choice: 'focal' (choose from 'ce', 'logit-adjusted', "
     "'balanced-softmax') (see --help)"),
    ("trainer.py", ["--sampler", "inverse"],
     "trainer.py: error: argument --sampler: invalid choice: 'inverse' (choose from 'balanced', 'sqrt', 'none') "
     "(see --help)"),
    ("trainer.py", ["--repair-model", "resnet8"],
     "trainer.py: error: argument --repair-model: invalid choice: 'resnet8' (choose from 'best', 'simple') (see "
     "--help)"),
    ("trainer.py", ["--repair-epochs", "0"],
     "trainer.py: error: argument --repair-epochs: expected a whole number from 1 to 10000, got 0 (see --help)"),
    ("trainer.py", ["--adversarial", "cw"],
     "trainer.py: error: argument --adversarial: invalid choice: 'cw' (choose from 'none', 'fgsm-rs', 'pgd', "
     "'fgsm') (see --help)"),
    ("trainer.py", ["--adv-epsilon", "0"],
     "trainer.py: error: argument --adv-epsilon: expected a finite number in (0, 1], got 0 (see --help)"),
    ("trainer.py", ["--adv-epsilon", "8/0"],
     "trainer.py: error: argument --adv-epsilon: expected a number in (0, 1], got '8/0' (see --help)"),
    ("trainer.py", ["--adv-epsilon", "1e999"],
     "trainer.py: error: argument --adv-epsilon: expected a finite number in (0, 1], got 1e999 (see --help)"),
    ("trainer.py", ["--adv-steps", "0"],
     "trainer.py: error: argument --adv-steps: expected a whole number from 1 to 1000, got 0 (see --help)"),
    ("trainer.py", ["--adv-step-size", "-1"],
     "trainer.py: error: argument --adv-step-size: expected a finite number in (0, 1], got -1 (see --help)"),
    ("trainer.py", ["--robust-eval", "-1"],
     "trainer.py: error: argument --robust-eval: expected a whole number from 0 to 100000, got -1 (see --help)"),
    ("adversarialExample.py", ["--restarts", "0"],
     "adversarialExample.py: error: argument --restarts: expected a whole number from 1 to 1000, got 0 (see --help)"),
    ("tester.py", ["--batch-size", "-1"],
     "tester.py: error: argument --batch-size: expected a whole number of at least 1, got -1 (see --help)"),
    ("tester.py", ["--tta", "rotate"],
     "tester.py: error: argument --tta: invalid choice: 'rotate' (choose from 'none', 'flip') (see --help)"),
    ("tester.py", ["--device", "banana"],
     "tester.py: error: --device 'banana': expected cpu, cuda, cuda:N, mps or auto"),
    ("adversarialExample.py", ["--seed", str(2**70)],
     "adversarialExample.py: error: argument --seed: expected a whole number from 0 to 4294967295, got "
     "1180591620717411303424 (see --help)"),
    ("adversarialExample.py", ["--epsilons", "nan"],
     "adversarialExample.py: error: argument --epsilons: expected a finite number in [0, 1], got nan (see --help)"),
    ("adversarialExample.py", ["--epsilons", "0.1", "-0.1"],
     "adversarialExample.py: error: argument --epsilons: expected a finite number in [0, 1], got -0.1 (see --help)"),
    ("adversarialExample.py", ["--epsilons", "2"],
     "adversarialExample.py: error: argument --epsilons: expected a finite number in [0, 1], got 2 (see --help)"),
    ("adversarialExample.py", ["--example-epsilon", "inf"],
     "adversarialExample.py: error: argument --example-epsilon: expected a finite number in [0, 1], got inf (see "
     "--help)"),
    ("adversarialExample.py", ["--steps", "0"],
     "adversarialExample.py: error: argument --steps: expected a whole number from 1 to 10000, got 0 (see --help)"),
    ("adversarialExample.py", ["--step-size", "0"],
     "adversarialExample.py: error: argument --step-size: expected a finite number in (0, 1], got 0 (see --help)"),
    ("adversarialExample.py", ["--examples", "-1"],
     "adversarialExample.py: error: argument --examples: expected a whole number from 0 to 1000, got -1 (see "
     "--help)"),
    ("adversarialExample.py", ["--batch-size", "0"],
     "adversarialExample.py: error: argument --batch-size: expected a whole number of at least 1, got 0 (see "
     "--help)"),
    ("dataset.py", ["build", "--seed", "-1"],
     "dataset.py build: error: argument --seed: expected a whole number from 0 to 4294967295, got -1 (see --help)"),
    ("dataset.py", ["build", "--train-counts", "-1", "1", "1"],
     "dataset.py build: error: argument --train-counts: expected a whole number from 0 to 5000, got -1 (see --help)"),
    ("dataset.py", ["build", "--mislabeled", "999999"],
     "dataset.py build: error: argument --mislabeled: expected a whole number from 0 to 5000, got 999999 (see "
     "--help)"),
    ("dataset.py", ["build", "--dev-counts", "1", "2"],
     "dataset.py build: error: argument --dev-counts: expected 3 arguments (see --help)"),
    ("dataset.py", ["frobnicate"],
     "dataset.py: error: argument command: invalid choice: 'frobnicate' (choose from 'build', 'insights') (see "
     "--help)"),
]


@pytest.mark.parametrize("script,args,line", FLAG_CASES, ids=[f"{s} {' '.join(a)}" for s, a, _ in FLAG_CASES])
def test_bad_flag_is_one_line_naming_it(script, args, line, tmp_path):
    result = run(script, *args, cwd=tmp_path, timeout=60)
    assert_one_line(result)
    assert_message(result.stderr.strip(), line)
    assert list(tmp_path.iterdir()) == [], "a refused run wrote files"


HUGE = "9" * 5000
# (script, args, the whole line): each value thousands of characters long, cut in the line
HUGE_FLAG_CASES = {
    "--epochs of 5,000 digits": ("trainer.py", ["--epochs", HUGE],
     "trainer.py: error: argument --epochs: expected a whole number from 1 to 100000, got "
     "'9999999999999999999999999999999999999999... (5,000 characters)' (see --help)"),
    "--seed of 4,000 digits": ("trainer.py", ["--seed", HUGE[:4000]],
     "trainer.py: error: argument --seed: expected a whole number from 0 to 4294967295, got "
     "9999999999999999999999999999999999999999... (4,000 characters) (see --help)"),
    "--lr of 5,000 digits": ("trainer.py", ["--lr", HUGE],
     "trainer.py: error: argument --lr: expected a finite number in (0, inf), got "
     "9999999999999999999999999999999999999999... (5,000 characters) (see --help)"),
    "--model of 5,000 letters": ("trainer.py", ["--model", "x" * 5000],
     "trainer.py: error: argument --model: invalid choice: 'xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx... (5,000 "
     "characters)' (choose from 'best', 'resnet8', 'simple', 'whitened') (see --help)"),
    "an unknown flag of 5,000 letters": ("trainer.py", ["--" + "x" * 5000],
     "trainer.py: error: unrecognized arguments: --xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx... (5,002 characters) "
     "(see --help)"),
    "--device of 5,000 letters": ("tester.py", ["--device", "x" * 5000],
     "tester.py: error: --device 'xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx... (5,000 characters)': expected cpu, "
     "cuda, cuda:N, mps or auto"),
    "--epsilons of 5,000 digits": ("adversarialExample.py", ["--epsilons", "1/" + HUGE],
     "adversarialExample.py: error: argument --epsilons: expected a number in [0, 1], got "
     "'1/99999999999999999999999999999999999999... (5,002 characters)' (see --help)"),
    "--mislabeled of 5,000 digits": ("dataset.py", ["build", "--mislabeled", HUGE],
     "dataset.py build: error: argument --mislabeled: expected a whole number from 0 to 5000, got "
     "'9999999999999999999999999999999999999999... (5,000 characters)' (see --help)"),
}


@pytest.mark.parametrize("case", list(HUGE_FLAG_CASES))
def test_a_huge_flag_value_is_not_repeated_in_full(case, tmp_path):
    script, args, line = HUGE_FLAG_CASES[case]
    result = run(script, *args, cwd=tmp_path, timeout=60)
    assert_one_line(result)
    assert result.stderr.strip() == line
    assert len(result.stderr) < 400, result.stderr[:400]


# ---------------------------------------------------------------------------
# Outputs: checked before any work


def test_outputs_that_cannot_be_written_are_refused_before_any_work(tmp_path):
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    a_dir = tmp_path / "a_dir"
    a_dir.mkdir()
    cases = [
        ("trainer.py", ["--out", a_dir], f"--out {a_dir}: is a folder, expected a file name"),
        ("trainer.py", ["--out", a_file / "m.ckpt"],
         f"--out {a_file / 'm.ckpt'}: {a_file} is a file, so no file can be written under it"),
        ("trainer.py", ["--figures", a_file], f"--figures {a_file}: is a file, expected a folder"),
        ("tester.py", ["--out", a_file], f"--out {a_file}: is a file, expected a folder"),
        ("adversarialExample.py", ["--checkpoint", PRETRAINED, "--out", a_file / "x"],
         f"--out {a_file / 'x'}: {a_file} is a file, so no folder can be made under it"),
        ("dataset.py", ["insights", "--figures", a_file], f"--figures {a_file}: is a file, expected a folder"),
    ]
    for script, args, line in cases:
        start = time.time()
        result = run(script, *args, "--data", tmp_path / "missing.pickle", cwd=tmp_path, timeout=60) \
            if script != "dataset.py" else run(script, *args, cwd=tmp_path, timeout=60)
        assert_one_line(result)
        assert result.stderr == f"{script}: error: {line}\n"
        assert time.time() - start < 30
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_dir", "a_file"], "a refused run wrote files"


@needs_cifar
def test_build_into_a_file_is_refused(tmp_path):
    from conftest import cifar_dir

    (tmp_path / "data").write_text("x")
    result = run("dataset.py", "build", "--cifar-dir", cifar_dir(), "--out-dir", tmp_path / "data", cwd=tmp_path)
    assert_one_line(result)
    assert result.stderr == f"dataset.py: error: --out-dir {tmp_path / 'data'}: is a file, expected a folder\n"


def test_full_disk_mid_run_is_one_line_and_keeps_the_checkpoint(small_data, tmp_path):
    # Writes past 600 KB fail (EFBIG, as a full disk would fail them): the checkpoint (268 KB)
    # fits, the resume state (model plus Adam's moments, about 800 KB) does not.
    out = tmp_path / "m.ckpt"
    result = run("trainer.py", "--data", small_data / "train.pickle", "--dev-data", small_data / "dev.pickle",
                 "--epochs", "2", "--fix-labels", "none", "--out", out, "--figures", tmp_path / "fig",
                 cwd=tmp_path, file_size=600_000, timeout=300)
    assert_refused(result)
    assert result.stderr.strip().splitlines()[-1] == (
        f"trainer.py: error: {tmp_path / 'm.resume.pt'}: cannot write (File too large)")
    from models import load_model

    load_model(out)  # the checkpoint written before the failure is whole
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")], "temporary file left behind"


# ---------------------------------------------------------------------------
# --fix-labels files: strict


def corrections(tmp_path, text):
    path = tmp_path / "fixes.json"
    path.write_text(text if isinstance(text, str) else json.dumps(text))
    return path


FIX_CASES = {
    "fractional index": ([{"index": 1.9, "label": "cat"}],
     "--fix-labels {path}: entry 0: index 1.9 is not a whole number from 0 to 99"),
    "fractional label": ([{"index": 1, "label": 2.7}],
     "--fix-labels {path}: entry 0: label 2.7 is not one of car, truck, cat, 0-2, or null (drop the image)"),
    "boolean label": ([{"index": 1, "label": True}],
     "--fix-labels {path}: entry 0: label true is not one of car, truck, cat, 0-2, or null (drop the image)"),
    "boolean index": ([{"index": True, "label": "cat"}],
     "--fix-labels {path}: entry 0: index true is not a whole number from 0 to 99"),
    "duplicate index": ([{"index": 4, "label": "cat"}, {"index": 4, "label": "car"}],
     "--fix-labels {path}: entries 0 and 1 both correct image 4; keep one"),
    "index out of range": ([{"index": 10**9, "label": "cat"}],
     "--fix-labels {path}: entry 0: index 1000000000 is not a whole number from 0 to 99"),
    "unknown label name": ([{"index": 1, "label": "horse"}],
     "--fix-labels {path}: entry 0: label \"horse\" is not one of car, truck, cat, 0-2, or null (drop the image)"),
    "missing key": ([{"index": 1}],
     "--fix-labels {path}: entry 0 must be an object with exactly the keys index and label"),
    "not a list": ({"index": 1, "label": "cat"},
     "--fix-labels {path}: expected a list of {\"index\": i, \"label\": name} entries"),
    "not JSON": ("[{index: 1}]",
     "--fix-labels {path}: not valid JSON (Expecting property name enclosed in double quotes: line 1 column 3 (char "
     "2))"),
    "deeply nested": ("[" * 100_000 + "]" * 100_000,
     "--fix-labels {path}: nested too deeply to read; a corrections file is a flat list of {\"index\": i, \"label\": "
     "name} entries"),
    "index of 5,000 digits": ('[{"index": ' + "9" * 5000 + ', "label": "cat"}]',
     "--fix-labels {path}: holds a number of more than 4,300 digits, which no image index or label is"),
    "index of 4,000 digits": ('[{"index": ' + "9" * 4000 + ', "label": "cat"}]',
     "--fix-labels {path}: entry 0: index a number of about 4,000 digits is not a whole number from 0 to 99"),
    "label of 5,000 digits": ('[{"index": 1, "label": ' + "7" * 5000 + "}]",
     "--fix-labels {path}: holds a number of more than 4,300 digits, which no image index or label is"),
    "label of 4,000 digits": ('[{"index": 1, "label": ' + "7" * 4000 + "}]",
     "--fix-labels {path}: entry 0: label a number of about 4,000 digits is not one of car, truck, cat, 0-2, or "
     "null (drop the image)"),
    "label nested 100 deep": ('[{"index": 1, "label": ' + "[" * 100 + "]" * 100 + "}]",
     "--fix-labels {path}: entry 0: label a list of 1 item is not one of car, truck, cat, 0-2, or null (drop the "
     "image)"),
    "label a megabyte long": ([{"index": 1, "label": "x" * 2**20}],
     "--fix-labels {path}: entry 0: label \"xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx... (1,048,576 characters)\" is "
     "not one of car, truck, cat, 0-2, or null (drop the image)"),
    "a key given twice": ('[{"index": 3, "label": "truck", "index": 5}]',
     "--fix-labels {path}: the key 'index' appears twice in one object; json would keep the last silently"),
    "larger than corrections of its images take": ("[" + " " * 2**21 + "]",
     "--fix-labels {path}: 2,097,154 bytes, more than corrections of 100 images take (1,150,976)"),
}


@pytest.mark.parametrize("case", list(FIX_CASES))
def test_bad_corrections_file_is_refused(case, tmp_path):
    import label_repair
    from cli import UserError

    content, expected = FIX_CASES[case]
    path = corrections(tmp_path, content)
    with pytest.raises(UserError) as info:
        label_repair.read_corrections(path, 100)
    assert_message(str(info.value), expected, path=path)
    assert len(str(info.value)) < 400  # never the whole value


def test_bad_corrections_file_is_refused_before_training(small_data, tmp_path):
    fixes = corrections(tmp_path, [{"index": 1.9, "label": "cat"}])
    result = run("trainer.py", "--data", small_data / "train.pickle", "--dev-data", small_data / "dev.pickle",
                 "--fix-labels", fixes, "--out", tmp_path / "m.ckpt", "--figures", tmp_path / "fig", cwd=tmp_path)
    assert_one_line(result)
    assert result.stderr == (f"trainer.py: error: --fix-labels {fixes}: entry 0: index 1.9 is not a whole number from 0 "
                             "to 559\n")
    assert not (tmp_path / "m.ckpt").exists()


# ---------------------------------------------------------------------------
# Degenerate data


@pytest.fixture(scope="module")
def lopsided(tmp_path_factory):
    """A training set with 2 trucks and one with no trucks at all."""
    d = tmp_path_factory.mktemp("lopsided")
    g = torch.Generator().manual_seed(0)
    for name, counts in (("two_trucks", (40, 2, 30)), ("no_trucks", (40, 0, 30)), ("one_image", (1, 0, 0)),
                         ("dev", (10, 10, 10))):
        labels = torch.cat([torch.full((n,), c) for c, n in enumerate(counts)])
        items = [(torch.rand(3, 32, 32, generator=g) * 2 - 1, int(y)) for y in labels]
        dump(d / f"{name}.pickle", items, protocol=5)
    return d


@pytest.mark.parametrize("name,counts", [("two_trucks", "truck 2"), ("one_image", "car 1, truck 0, cat 0")])
def test_too_few_images_for_repair_folds_is_refused_with_a_way_out(lopsided, name, counts, tmp_path):
    data = lopsided / f"{name}.pickle"
    result = run("trainer.py", "--data", data, "--dev-data", lopsided / "dev.pickle",
                 "--fix-labels", "auto", "--out", tmp_path / "m.ckpt", "--figures", tmp_path / "fig", cwd=tmp_path)
    assert_one_line(result)
    assert result.stderr == (f"trainer.py: error: --fix-labels auto with 4 folds needs at least 4 images of each class, "
                             f"and {data} has {counts}; use fewer --repair-folds or --fix-labels none\n")


def test_missing_class_trains_with_a_one_line_warning(lopsided, tmp_path):
    result = run("trainer.py", "--data", lopsided / "no_trucks.pickle", "--dev-data", lopsided / "dev.pickle",
                 "--fix-labels", "none", "--epochs", "1", "--out", tmp_path / "m.ckpt", "--figures", tmp_path / "f",
                 cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    warnings = [line for line in result.stderr.splitlines() if line.startswith("warning:")]
    assert warnings == ["warning: the training labels hold no truck images; the model cannot learn to predict it"]


# ---------------------------------------------------------------------------
# Interruptions and concurrency


def test_ctrl_c_during_label_repair_says_so(small_data, tmp_path):
    def limited_with_ctrl_c():
        # A shell's background job (`pytest ... &`) has SIGINT ignored and its children inherit that: the
        # run would repair for 200 epochs. The trainer gets the default SIGINT, as a terminal's Ctrl-C finds it.
        limited()()
        signal.signal(signal.SIGINT, signal.SIG_DFL)

    with reaped(subprocess.Popen(
            [sys.executable, str(ROOT / "trainer.py"), "--data", small_data / "train.pickle", "--dev-data",
             small_data / "dev.pickle", "--fix-labels", "auto", "--repair-epochs", "200", "--out",
             tmp_path / "m.ckpt", "--figures", tmp_path / "fig"],
            cwd=tmp_path, stderr=subprocess.PIPE, text=True, preexec_fn=limited_with_ctrl_c,
            env={**os.environ, "MPLBACKEND": "Agg", "PYTHONUNBUFFERED": "1"})) as proc:
        deadline = time.time() + 120
        seen = ""
        while "Label repair" not in seen and time.time() < deadline:
            seen += proc.stderr.readline()
        time.sleep(1.0)
        proc.send_signal(signal.SIGINT)
        rest = proc.communicate(timeout=60)[1]
    stderr = seen + rest
    assert proc.returncode == 130
    assert "Traceback" not in stderr
    assert stderr.strip().splitlines()[-1] == (
        "trainer.py: error: interrupted during label repair, before training started: nothing was saved; run again, "
        "or skip repair with --fix-labels none")


def test_second_trainer_on_the_same_output_stops_with_one_line(small_data, tmp_path):
    import fcntl

    out = tmp_path / "m.ckpt"
    with open(f"{out}.lock", "a+b") as held:  # what a running trainer.py holds
        fcntl.flock(held.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        result = run("trainer.py", "--data", small_data / "train.pickle", "--dev-data", small_data / "dev.pickle",
                     "--fix-labels", "none", "--out", out, "--figures", tmp_path / "fig", cwd=tmp_path)
    assert_one_line(result)
    assert result.stderr == (f"trainer.py: error: --out {out}: another run is writing it (lock {out}.lock is held); "
                             "wait for it to finish or choose another output\n")
    assert not out.exists()


def test_resume_after_the_training_data_changed_is_refused(small_data, tmp_path):
    data = tmp_path / "train.pickle"
    data.write_bytes((small_data / "train.pickle").read_bytes())
    common = ["--data", data, "--dev-data", small_data / "dev.pickle", "--fix-labels", "none", "--epochs", "1",
              "--out", tmp_path / "m.ckpt", "--figures", tmp_path / "fig"]
    assert run("trainer.py", *common, cwd=tmp_path).returncode == 0
    from dataset import load_pickle, save_pickle

    images, labels = load_pickle(data)
    save_pickle(data, images.flip(0), labels.flip(0))  # same images, other order: stored labels would misalign
    result = run("trainer.py", *common, "--resume", cwd=tmp_path)
    assert_one_line(result)
    assert result.stderr == (f"trainer.py: error: --resume: {tmp_path / 'm.resume.pt'}: the training data {data} has "
                             "changed since it was written (its stored labels belong to other images); restore that "
                             "data or start without --resume\n")


def test_tampered_resume_state_with_nan_weights_is_refused(small_data, tmp_path):
    common = ["--data", small_data / "train.pickle", "--dev-data", small_data / "dev.pickle", "--fix-labels",
              "none", "--epochs", "1", "--out", tmp_path / "m.ckpt", "--figures", tmp_path / "fig"]
    assert run("trainer.py", *common, cwd=tmp_path).returncode == 0
    state_path = tmp_path / "m.resume.pt"
    state = torch.load(state_path, weights_only=True)
    state["model"]["fc2.weight"].fill_(float("nan"))
    torch.save(state, state_path)
    result = run("trainer.py", *common, "--resume", cwd=tmp_path)
    assert_refused(result)
    assert result.stderr.strip().splitlines()[-1] == (
        f"trainer.py: error: --resume: {state_path}: model: tensor fc2.weight holds NaN or infinite values: the resume "
        "state is corrupted or comes from a diverged run; delete it to start over, or run without --resume")


def test_messages_never_advise_weights_only_false(crafted, tmp_path):
    for kind in ("data", "checkpoint"):
        for outcome in crafted[kind][1].values():
            assert "weights_only=False" not in outcome


# ---------------------------------------------------------------------------
# Tampered resume states, made from a real short run


RESUME_FLAGS = ["--fix-labels", "none", "--epochs", "2", "--batch-size", "64", "--val-fraction", "0.2",
                "--select", "best-val", "--ema", "0.9"]


@pytest.fixture(scope="module")
def resume_state(small_data, tmp_path_factory):
    """A real resume state after epoch 1 of 2 (EMA, best-validation record), and the flags that made it."""
    import trainer
    from dataset import load_pickle

    out = tmp_path_factory.mktemp("resume")
    flags = ["--data", str(small_data / "train.pickle"), "--dev-data", str(small_data / "dev.pickle"), *RESUME_FLAGS,
             "--out", str(out / "m.ckpt"), "--figures", str(out / "fig")]
    line = trainer.epoch_line

    def stop_in_epoch_2(epoch, *rest):
        if epoch == 2:
            raise KeyboardInterrupt
        return line(epoch, *rest)

    trainer.epoch_line = stop_in_epoch_2
    try:
        with pytest.raises(Exception, match="interrupted"):
            trainer.train(*load_pickle(small_data / "train.pickle"), *load_pickle(small_data / "dev.pickle"),
                          trainer.parse_args(flags), "cpu")
    finally:
        trainer.epoch_line = line
    return torch.load(out / "m.resume.pt", weights_only=True), flags


def tamper(key, change):
    """A change to a copy of the state: change(value) returns the new value of state[key]."""
    return key, change


def in_optimizer_state(name, make):
    def change(optimizer):
        optimizer["state"][0][name] = make(optimizer["state"][0][name])
        return optimizer
    return change


def set_item(container_key, value):
    def change(container):
        container[container_key] = value
        return container
    return change


def first_epoch(change):
    def apply(history):
        history[0] = change(history[0])
        return history
    return apply


# name -> (the refusal's whole line after "trainer.py: error: ", {state} standing for the resume state's path and
# {ckpt} for the checkpoint's, or "ok"; the change). Numbers computed in floating point are patterns (pattern()).
RESUME_CASES = {
    "untouched": ("ok", None),
    "keep as a list": (
        "--resume: {state}: keep is a list of 560 items, expected a torch.bool tensor of shape [560]; delete it to "
        "start over, or run without --resume", tamper("keep", lambda keep: keep.tolist())),
    "keep as integer indices": (
        "--resume: {state}: keep is a torch.int64 tensor of shape [560], expected a torch.bool tensor of shape "
        "[560]; delete it to start over, or run without --resume",
        tamper("keep", lambda keep: keep.nonzero().flatten())),
    "keep drops every image": (
        "--resume: {state}: keep keeps no image; delete it to start over, or run without --resume",
        tamper("keep", torch.zeros_like)),
    "labels shorter than the data": (
        "--resume: {state}: labels is a torch.int64 tensor of shape [10], expected a torch.int64 tensor of shape "
        "[560]; delete it to start over, or run without --resume", tamper("labels", lambda labels: labels[:10])),
    "a label 7": (
        "--resume: {state}: labels holds values other than 0 (car), 1 (truck) and 2 (cat); delete it to start over, "
        "or run without --resume", tamper("labels", lambda labels: labels.index_fill(0, torch.tensor([3]), 7))),
    "float labels": (
        "--resume: {state}: labels is a torch.float32 tensor of shape [560], expected a torch.int64 tensor of shape "
        "[560]; delete it to start over, or run without --resume", tamper("labels", lambda labels: labels.float())),
    "epoch 0": (
        "--resume: {state}: epoch 0 is not one of 1 to 2; delete it to start over, or run without --resume",
        tamper("epoch", lambda e: 0)),
    "epoch past the run": (
        "--resume: {state}: epoch 9 is not one of 1 to 2; delete it to start over, or run without --resume",
        tamper("epoch", lambda e: 9)),
    "epoch as text": (
        "--resume: {state}: epoch '1' is not one of 1 to 2; delete it to start over, or run without --resume",
        tamper("epoch", lambda e: "1")),
    "epoch of 5,000 digits": (
        "--resume: {state}: refused: torch's weights-only loader does not read what this resume state holds (the "
        "pickle instruction LONG4: a whole number of more than 255 bytes); delete it to start over, or run without "
        "--resume", tamper("epoch", lambda e: 10**5000)),  # torch refuses it
    "epoch of 40 digits": (
        "--resume: {state}: epoch a number of about 40 digits is not one of 1 to 2; delete it to start over, or run "
        "without --resume", tamper("epoch", lambda e: 10**40)),
    "best of the wrong type": (
        "--resume: {state}: best is 'epoch 1', not the record of one of its epochs; delete it to start over, or run "
        "without --resume", tamper("best", lambda best: "epoch 1")),
    "best scoring what no epoch scored": (
        "--resume: {state}: best is a dict of 2 items, not the record of one of its epochs; delete it to start "
        "over, or run without --resume", tamper("best", lambda best: {**best, "score": 0.99})),
    "best from a later epoch": (
        "--resume: {state}: best is a dict of 2 items, not the record of one of its epochs; delete it to start "
        "over, or run without --resume", tamper("best", lambda best: {**best, "epoch": 2})),
    "history too short": (
        "--resume: {state}: history is a list of 0 items, expected a list of 1 epoch; delete it to start over, or "
        "run without --resume", tamper("history", lambda history: [])),
    "history with NaN accuracy": (
        "--resume: {state}: history [0] dev balanced_accuracy is nan, expected a finite number from 0 to 1; delete "
        "it to start over, or run without --resume",
        tamper("history", first_epoch(
            lambda h: {**h, "dev": {**h["dev"], "balanced_accuracy": float("nan")}}))),
    "history with accuracy 7": (
        "--resume: {state}: history [0] dev accuracy is 7.0, expected a finite number from 0 to 1; delete it to "
        "start over, or run without --resume",
        tamper("history", first_epoch(
            lambda h: {**h, "dev": {**h["dev"], "accuracy": 7.0}}))),
    "history with a string loss": (
        "--resume: {state}: history [0] is a dict of 4 items, not an epoch's record with its loss; delete it to "
        "start over, or run without --resume", tamper("history", first_epoch(lambda h: {**h, "loss": "0.5"}))),
    "history of another epoch": (
        "--resume: {state}: history [0] is not epoch 1's record; delete it to start over, or run without --resume",
        tamper("history", first_epoch(lambda h: {**h, "epoch": 5}))),
    "other learning rate": (
        "--resume: {state}: belongs to a run with other settings (lr 0.5 there, 0.001 here); use the same flags or "
        "start without --resume", tamper("config", set_item("lr", 0.5))),
    "a tensor among the settings": (
        "--resume: {state}: config seed is a torch.float32 tensor of shape [3], not a setting; delete it to start "
        "over, or run without --resume", tamper("config", set_item("seed", torch.zeros(3)))),
    "data fingerprint of the wrong type": (
        "--resume: {state}: data_sha256 is 12345, not the SHA-256 of training data (the resume state is malformed); "
        "delete it to start over, or run without --resume", tamper("data_sha256", lambda sha: 12345)),
    "missing key": (
        "--resume: {state}: not a resume state of this trainer.py (it has no scheduler); delete it to start over, "
        "or run without --resume", None),
    "weights that are not a state_dict": (
        "--resume: {state}: model: expected a state_dict (names and tensors), found None; delete it to start over, "
        "or run without --resume", tamper("model", lambda model: None)),
    "average missing": (
        "--resume: {state}: average is missing; delete it to start over, or run without --resume",
        tamper("average", lambda average: None)),
    "NaN in the average": (
        "--resume: {state}: average: tensor fc1.weight holds NaN or infinite values: the resume state is corrupted "
        "or comes from a diverged run; delete it to start over, or run without --resume",
        tamper("average", set_item(
            "fc1.weight", torch.full((120, 400), float("nan"))))),
    "NaN in Adam's moments": (
        "--resume: {state}: optimizer state 0 exp_avg holds NaN or infinite values; delete it to start over, or run "
        "without --resume",
        tamper("optimizer", in_optimizer_state(
            "exp_avg", lambda t: torch.full_like(t, float("nan"))))),
    "Adam's moments of the wrong shape": (
        "--resume: {state}: optimizer state 0 exp_avg_sq is a torch.float32 tensor of shape [3], expected a "
        "torch.float32 tensor of shape [16, 3, 5, 5]; delete it to start over, or run without --resume",
        tamper("optimizer", in_optimizer_state("exp_avg_sq", lambda t: torch.zeros(3)))),
    "state of a parameter that does not exist": (
        "--resume: {state}: optimizer state 99 is not the state of one of this model's parameters (0 to 9); delete "
        "it to start over, or run without --resume",
        tamper("optimizer", lambda o: {
            **o, "state": {**o["state"], 99: o["state"][0]}})),
    "NaN learning rate": (
        "--resume: {state}: optimizer param_groups [0] lr is nan, expected a finite number; delete it to start "
        "over, or run without --resume",
        tamper("optimizer", lambda o: {
            **o, "param_groups": [{**o["param_groups"][0], "lr": float("nan")}]})),
    "other weight decay": (
        "--resume: {state}: optimizer param_groups hold other settings than this run's (weight_decay 0.5, not 0); "
        "delete it to start over, or run without --resume",
        tamper("optimizer", lambda o: {
            **o, "param_groups": [{**o["param_groups"][0], "weight_decay": 0.5}]})),
    "other epsilon": (
        "--resume: {state}: optimizer param_groups hold other settings than this run's (eps 0.5, not 1e-08); delete "
        "it to start over, or run without --resume",
        tamper("optimizer", lambda o: {
            **o, "param_groups": [{**o["param_groups"][0], "eps": 0.5}]})),
    "schedule at another step": (
        "--resume: {state}: scheduler stands at step 3, not at the end of epoch 1; delete it to start over, or run "
        "without --resume", tamper("scheduler", set_item("last_epoch", 3))),
    "schedule of another length": (
        "--resume: {state}: scheduler has other settings than this run's schedule (total_steps 7, not 14); delete "
        "it to start over, or run without --resume", tamper("scheduler", set_item("total_steps", 7))),
    "schedule as a list": (
        "--resume: {state}: scheduler is a list of 1 item, not the state of this run's schedule; delete it to start "
        "over, or run without --resume", tamper("scheduler", lambda s: [s])),
    "labels on the meta device": (
        "--resume: {state}: refused: it refers to torch._utils._rebuild_meta_tensor_no_storage, which a resume "
        "state never holds; delete it to start over, or run without --resume",
        tamper(
            "labels", lambda labels: torch.zeros_like(labels, device="meta"))),
    "sparse keep mask": (
        "--resume: {state}: refused: it refers to torch._utils._rebuild_sparse_tensor, which a resume state never "
        "holds; delete it to start over, or run without --resume", tamper("keep", lambda keep: keep.to_sparse())),
    "Adam state without its moments": (
        "--resume: {state}: optimizer state 0 holds 'step', not the state Adam keeps per parameter (step, exp_avg, "
        "exp_avg_sq); delete it to start over, or run without --resume",
        tamper("optimizer", lambda o: {
            **o, "state": {**o["state"], 0: {"step": o["state"][0]["step"]}}})),
    "Adam's second moment negative": (
        "--resume: {state}: optimizer state 0 exp_avg_sq holds negative values (a mean of squares); delete it to "
        "start over, or run without --resume",
        tamper("optimizer", in_optimizer_state(
            "exp_avg_sq", lambda t: -torch.ones_like(t)))),
    "Adam's step count off": (
        "--resume: {state}: optimizer state 0 step counts 1 step, not the 7 of the saved epochs; delete it to start "
        "over, or run without --resume",
        tamper("optimizer", in_optimizer_state(
            "step", lambda t: torch.ones_like(t)))),
    "Adam state of one parameter dropped": (
        "--resume: {state}: optimizer state covers 9 of this model's 10 parameters, not all; delete it to start "
        "over, or run without --resume",
        tamper(
            "optimizer", lambda o: {**o, "state": {k: v for k, v in o["state"].items() if k != 3}})),
    "settings whose get method is shadowed": (
        "--resume: {state}: refused: it sets attributes of a dict other than a state_dict's _metadata; delete it to "
        "start over, or run without --resume", tamper("config", lambda config: shadowed(config, get=5))),
    "learning rate 1000": (
        pattern("--resume: {state}: optimizer param_groups lr is 1000.0, not the {rate} this run's schedule gives "
                "after 7 steps; delete it to start over, or run without --resume", rate=r"0\.00050660176650\d*"),
        tamper("optimizer", lambda o: {
            **o, "param_groups": [{**o["param_groups"][0], "lr": 1000.0}]})),
    "Adam's beta2 set to 1": (
        pattern("--resume: {state}: optimizer param_groups betas is ({beta1}, 1.0), not the ({beta1}, 0.999) this "
                "run's schedule gives after 7 steps; delete it to start over, or run without --resume",
                beta1=r"0\.89934002070946\d*"),
        tamper("optimizer", lambda o: {
            **o, "param_groups": [{**o["param_groups"][0], "betas": (o["param_groups"][0]["betas"][0], 1.0)}]})),
    "best score as a tensor": (
        "--resume: {state}: best is a dict of 2 items, not the record of one of its epochs; delete it to start "
        "over, or run without --resume",
        tamper("best", lambda best: {
            **best, "score": torch.tensor([best["score"]] * 2)})),
    "best score and its history raised to 1.0": (
        pattern("--resume: {state}: best says epoch 1 scored 1.0000 on the validation split, but {ckpt} scores "
                "{score}; delete it to start over, or run without --resume", score=r"0\.\d{4}"), None),
    "labels changed under --fix-labels none": (
        "--resume: {state}: labels differ from what --fix-labels none gives; delete it to start over, or run "
        "without --resume",
        tamper(
            "labels", lambda labels: (labels + 1) % 3)),
    "one image dropped under --fix-labels none": (
        "--resume: {state}: keep differs from what --fix-labels none gives; delete it to start over, or run without "
        "--resume",
        tamper(
            "keep", lambda keep: keep.index_fill(0, torch.tensor([5]), False))),
    "schedule flagged as not yet stepped": (
        "--resume: {state}: scheduler _is_initial is True, not what this run's schedule has after 7 steps; delete "
        "it to start over, or run without --resume", tamper("scheduler", set_item("_is_initial", True))),
    "not a dict": (
        "--resume: {state}: not a resume state of this trainer.py (it holds a list of 1 item, not a dict); delete "
        "it to start over, or run without --resume", None),
}


@pytest.mark.parametrize("case", list(RESUME_CASES))
def test_tampered_resume_state(case, resume_state, tmp_path):
    import copy

    state, flags = resume_state
    words, change = RESUME_CASES[case]
    state = copy.deepcopy(state)
    if case == "not a dict":
        state = [state["model"]]
    elif case == "missing key":
        del state["scheduler"]
    elif case == "best score and its history raised to 1.0":
        state["history"][0]["val"]["balanced_accuracy"] = 1.0
        state["best"] = {"epoch": 1, "score": 1.0}
    elif change is not None:
        key, edit = change
        state[key] = edit(state[key])
    shutil.copy(flags[flags.index("--out") + 1], tmp_path / "m.ckpt")  # the best epoch's weights, as kept
    flags = [f if not f.endswith("m.ckpt") else str(tmp_path / "m.ckpt") for f in flags]
    flags = [f if not f.endswith("fig") else str(tmp_path / "fig") for f in flags]
    torch.save(state, tmp_path / "m.resume.pt")
    result = run("trainer.py", *flags, "--resume", cwd=tmp_path)
    if words == "ok":
        assert result.returncode == 0, result.stderr
        assert "Resuming" in result.stderr and "epoch   2" in result.stderr
    else:
        assert_one_line(result)
        assert_message(result.stderr.strip(), words, "trainer.py: error: ", state=tmp_path / "m.resume.pt",
                       ckpt=tmp_path / "m.ckpt", data=flags[flags.index("--data") + 1])
        assert len(result.stderr) < 600


def test_torch_running_out_of_memory_is_one_line(capsys):
    import cli

    def allocate():  # what torch's CPU allocator raises when the system refuses
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:117] data. DefaultCPUAllocator: can't allocate memory: "
                           "you tried to allocate 68719476736 bytes. Error code 12 (Cannot allocate memory)")

    with pytest.raises(SystemExit) as stopped:
        cli.run_main(allocate)
    assert stopped.value.code == 1
    assert capsys.readouterr().err.endswith(": error: out of memory; try a smaller --batch-size or smaller data\n")

    def bug():
        raise RuntimeError("mat1 and mat2 shapes cannot be multiplied")

    with pytest.raises(RuntimeError):  # a bug keeps its traceback
        cli.run_main(bug)


def test_float8_weights_are_refused_by_the_state_dict_check():
    from cli import UserError
    from models import SimpleModel
    from untrusted import check_state_dict

    state = SimpleModel().state_dict()
    state["fc1.weight"] = state["fc1.weight"].to(torch.float8_e4m3fn)
    with pytest.raises(UserError) as info:
        check_state_dict(SimpleModel(), state, "m.ckpt")
    assert str(info.value) == ("m.ckpt: tensor fc1.weight has dtype torch.float8_e4m3fn, not one a model trains in "
                               "(torch.float16, torch.bfloat16, torch.float32, torch.float64)")


def test_sgd_state_without_its_momentum_buffer_is_refused():
    from resume_state import _optimizer_problem

    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True)
    model(torch.ones(1, 3)).sum().backward()
    optimizer.step()
    saved = optimizer.state_dict()
    settings = [{k: g[k] for k in ("lr", "momentum") if k in g} for g in optimizer.param_groups]
    assert _optimizer_problem(saved, optimizer, 1, settings) is None
    saved["state"][0]["momentum_buffer"] = None  # momentum would silently restart from zero
    assert _optimizer_problem(saved, optimizer, 1, settings) == "state 0 has no momentum buffer after 1 step with momentum"
