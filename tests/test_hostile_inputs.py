"""A hostile-input sweep: malicious and malformed files, bad flags, unwritable outputs, faults.

Every case has one expected outcome: refused with one `error:` line (non-zero exit, no
traceback), or accepted. File cases are loaded in one child process per kind, CLI cases run
the real scripts; every child runs under an address-space limit, so a bomb that got through
would fail its case instead of taking the machine down.
"""
import codecs
import collections
import io
import json
import os
import pickle
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

from conftest import ROOT, needs_cifar, run_script

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


def crafted_tensor(blob, offset=0, size=(3, 32, 32), stride=(1024, 32, 1), requires_grad=False):
    storage = Call(torch.storage._load_from_bytes, blob)
    return Call(torch._utils._rebuild_tensor_v2, storage, offset, size, stride, requires_grad,
                collections.OrderedDict())


def good_image(value=0.0):
    return crafted_tensor(legacy_blob(image_bytes(value), 3072))


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


GOOD = [(torch.zeros(3, 32, 32), i % 3) for i in range(4)]


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

# name -> (expected: "ok" or words of the one-line refusal, content(marker): object to pickle or Raw bytes)
# 10**5000 as pickle's LONG4 opcode: a number with 5,000 digits in 2,082 bytes.
HUGE_LONG4 = b"\x8b" + struct.pack("<i", 2077) + (10**5000).to_bytes(2077, "little")

DATA_CASES = {
    "valid, protocol 2": ("ok", lambda m: GOOD),
    "valid, protocol 5": ("ok", lambda m: GOOD),  # written with protocol 5 below
    "valid, crafted like torch writes it": ("ok", lambda m: [(good_image(0.5), 1)]),
    "valid, 0-d integer tensor labels": ("ok", lambda m: [(torch.zeros(3, 32, 32), torch.tensor(2))]),
    "storage declared on the meta device": (
        "ok", lambda m: [(crafted_tensor(legacy_blob(image_bytes(), 3072, location="meta")), 0)]),
    # Code execution
    "os.system at top level": ("refused", lambda m: Call(os.system, f"touch {m}")),
    "os.system inside an item": ("refused", lambda m: GOOD[:2] + [(Call(os.system, f"touch {m}"), 0)]),
    "os.system inside storage bytes": ("refused", payload_in_storage_bytes),
    "builtins.eval": ("refused", lambda m: [(Call(eval, "1+1"), 0)]),
    # What course code writes besides the format itself (issue: course drop-in, round two)
    "numpy image": ("ok", lambda m: [(torch.zeros(3, 32, 32).numpy(), 0)]),
    "numpy image, protocol 5": ("ok", lambda m: [(torch.zeros(3, 32, 32).numpy(), 0)]),
    "batch-of-one image [1, 3, 32, 32]": ("ok", lambda m: [(torch.zeros(1, 3, 32, 32), 1)]),
    "numpy int64 label": ("ok", lambda m: [(torch.zeros(3, 32, 32), np.int64(2))]),
    "numpy 0-d array label": ("ok", lambda m: [(torch.zeros(3, 32, 32), np.array(1))]),
    "pickled dataset.MyDataset": ("ok", lambda m: course_dataset(GOOD)),
    "pickled MyDataset of the student's own": ("ok", lambda m: MyDataset(GOOD)),
    "MyDataset holding a transform": ("transform", lambda m: course_dataset(GOOD, transform=1)),
    "MyDataset holding code as its transform": ("refers to posix.system", lambda m: course_dataset(
        GOOD, transform=Call(os.system, f"touch {m}"))),
    "another class": ("refers to", lambda m: OtherDataset(GOOD)),
    "numpy float64 image (read as float32)": ("ok", lambda m: [(np.zeros((3, 32, 32)), 0)]),
    "numpy object array image": ("not a plain number type", lambda m: [(np.array([None, 1], dtype=object), 0)]),
    "numpy array claiming more than its bytes": ("holds 12,288 bytes", lambda m: oversized_array()),
    "numpy scalar label 2.0": ("label", lambda m: [(torch.zeros(3, 32, 32), np.float64(2.0))]),
    "torch.save zip instead of a pickle": ("zip archive", lambda m: zipped(GOOD)),
    # Resource bombs
    "nested hex codec expansion": ("codec", lambda m: [(crafted_tensor(
        Call(codecs.encode, Call(codecs.encode, "ab" * 500, "hex"), "hex")), 0)]),
    "storage claims 2**34 elements": ("claim", lambda m: [(crafted_tensor(legacy_blob(image_bytes(), 2**34)), 0)]),
    "storage count disagrees with its declaration": (
        "declares", lambda m: [(crafted_tensor(legacy_blob(image_bytes(), 3072, count=2**40)), 0)]),
    "storage data truncated": (
        "claim", lambda m: [(crafted_tensor(legacy_blob(image_bytes()[:100], 3072)), 0)]),
    "tensor reaching past its storage": (
        "reaches element", lambda m: [(crafted_tensor(legacy_blob(image_bytes(), 3072), offset=100), 0)]),
    "tensor with a huge size": ("reaches element", lambda m: [(crafted_tensor(
        legacy_blob(image_bytes(), 3072), size=(3, 32, 2**40), stride=(1, 1, 1)), 0)]),
    "tensor with a negative stride": ("invalid layout", lambda m: [(crafted_tensor(
        legacy_blob(image_bytes(), 3072), stride=(1024, 32, -1)), 0)]),
    "one image referenced 200,000 times": ("pickle instructions", lambda m: [(SHARED, 0)] * 200_000),
    "one storage rebuilt 100,000 times": ("pickle instructions", lambda m: one_image_rebuilt(100_000)),
    "BINBYTES8 declaring a terabyte": ("data pickle", lambda m: Raw(b"\x80\x04\x8e" + struct.pack("<Q", 2**40))),
    "deeply nested lists": ("pickle instructions",
                            lambda m: Raw(b"\x80\x02" + b"]" * 50_000 + b"a" * 49_999 + b".")),
    # Silent garbage the course format does not allow
    "image requires grad": ("requires_grad", lambda m: [(crafted_tensor(
        legacy_blob(image_bytes(), 3072), requires_grad=True), 0)]),
    "bool label tensor(True)": ("label", lambda m: [(torch.zeros(3, 32, 32), torch.tensor(True))]),
    "bool label True": ("label", lambda m: [(torch.zeros(3, 32, 32), True)]),
    "1-d label tensor": ("ok", lambda m: [(torch.zeros(3, 32, 32), torch.tensor([1]))]),
    "2-element label tensor": ("label", lambda m: [(torch.zeros(3, 32, 32), torch.tensor([1, 2]))]),
    "huge int label": ("label", lambda m: [(torch.zeros(3, 32, 32), 2**100)]),
    "label 10**5000": ("label a number of about 5,000 digits", lambda m: [(torch.zeros(3, 32, 32), 10**5000)]),
    "label nested 200,000 lists deep": ("pickle instructions",
                                        lambda m: label_as_raw(b"]" * 200_000 + b"a" * 199_999)),
    "label a megabyte string": ("(1,048,576 characters)", lambda m: [(torch.zeros(3, 32, 32), "x" * 2**20)]),
    "label nested 1,000 lists deep": ("label a list of 1 items",
                                      lambda m: label_as_raw(b"]" * 1_000 + b"a" * 999)),
    # Found by review: what Python's C unpickler or BUILD let a few bytes do
    "memo index 2**30 (the C unpickler grew its memo to it)": (
        "expected a list", lambda m: Raw(b"\x80\x02Nr" + struct.pack("<I", 2**30) + b".")),
    "a million one-byte opcodes (empty dicts)": ("pickle instructions", lambda m: Raw(b"\x80\x04" + b"}0" * 500_000 + b"N.")),
    "BUILD resizing a tensor's storage": ("it sets the state of a torch.float32 tensor", lambda m: [(CallThenSetState(
        torch._utils._rebuild_tensor_v2, (Call(torch.storage._load_from_bytes, legacy_blob(image_bytes()[:4], 1)), 0,
                                          (1,), (1,), False, collections.OrderedDict()), (None, 0, (3, 32, 32), (1024, 32, 1))), 0)]),
    "a numpy array that never gets its data": ("an array has no data", lambda m: Raw(
        b"\x80\x02]" + UNBUILT_ARRAY + b"K\x00\x86a.")),
    "a MyDataset that never gets its list": ("a MyDataset has no the_list", lambda m: Raw(
        b"\x80\x02cdataset\nMyDataset\n)\x81.")),
    "a set of ints": ("builds a set", lambda m: Raw(pickle.dumps([(torch.zeros(3, 32, 32), 0), {1, 2}], protocol=4))),
    "dict keys sharing one hash": ("a dict has the key", lambda m: Raw(same_hash_keys(1000))),
    "OrderedDict built from a list of items": ("builds an OrderedDict from a list of items", lambda m: [
        (torch.zeros(3, 32, 32), 0), Call(collections.OrderedDict, [(1, 2)])]),
    "dict key that is a float": ("a dict has the key 0.5", lambda m: [(torch.zeros(3, 32, 32), 0), {0.5: 1}]),
    "items set on a list": ("it sets items of a list", lambda m: Raw(b"\x80\x02]K\x00K\x01s.")),
    "protocol-0 memo slot of 40 digits": ("memo slot", lambda m: Raw(b"(lp" + b"9" * 40 + b"\n.")),
    "BYTEARRAY8 declaring 64 GiB in 10 bytes": ("declares 68,719,476,736 bytes", lambda m: Raw(
        b"\x80\x05\x96" + struct.pack("<Q", 2**36) + b".")),
    "tensor stride of 5,000 digits": ("invalid layout", lambda m: [(crafted_tensor(
        legacy_blob(image_bytes(), 3072), size=(3, 10**5000, 1), stride=(1024, 10**5000, 1)), 0)]),
    "numpy array with a dimension of 5,000 digits": ("invalid shape", lambda m: Raw(
        pickle.dumps([(np.zeros((3, 2, 7), np.float32), 0)], protocol=2).replace(
            b"K\x02K\x07", b"K\x02" + HUGE_LONG4, 1))),
    "float64 image (read as float32)": ("ok", lambda m: [(torch.zeros(3, 32, 32, dtype=torch.float64), 0)]),
    "float16 image": ("float16", lambda m: [(torch.zeros(3, 32, 32, dtype=torch.float16), 0)]),
    "NaN image": ("NaN", lambda m: [(torch.full((3, 32, 32), float("nan")), 0)]),
    "empty list": ("empty", lambda m: []),
    "a dict": ("expected a list", lambda m: {"images": 1}),
    "zero bytes": ("data pickle", lambda m: Raw(b"")),
    "random bytes": ("data pickle", lambda m: Raw(os.urandom(4096))),
    "a text file": ("data pickle", lambda m: Raw(b"car,truck,cat\n1,2,3\n")),
    "truncated in the middle": ("data pickle", lambda m: truncated_pickle()),
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


# name -> (expected, write(path, marker)); PRETRAINED itself is the "shipped" case
CHECKPOINT_CASES = {
    "the shipped checkpoint": ("ok", None),
    "legacy format": ("ok", lambda p, m: state_dict_file(p, base_state(), legacy=True)),
    "bare state_dict": ("ok", lambda p, m: torch.save(base_state(), p)),
    "NaN weights": ("fc1.weight holds NaN", lambda p, m: state_dict_file(p, with_tensor("fc1.weight", nan_row))),
    "infinite weights": ("conv2.bias holds NaN or infinite", lambda p, m: state_dict_file(
        p, with_tensor("conv2.bias", lambda t: torch.full_like(t, float("inf"))))),
    "NaN weights, legacy": ("holds NaN", lambda p, m: state_dict_file(
        p, with_tensor("fc1.weight", nan_row), legacy=True)),
    "integer weights": ("dtype torch.int64", lambda p, m: state_dict_file(
        p, with_tensor("fc3.weight", lambda t: t.long()))),
    "corrupted middle": ("checksum", lambda p, m: corrupted_middle(p)),
    "compressed entries": ("compressed", lambda p, m: deflated(p)),
    "os.system payload (zip)": ("refused", lambda p, m: torch.save(Call(os.system, f"touch {m}"), p)),
    "os.system payload (legacy)": ("refused", lambda p, m: torch.save(
        Call(os.system, f"touch {m}"), p, _use_new_zipfile_serialization=False)),
    "legacy storage claims 64 GiB": ("claim", lambda p, m: p.write_bytes(legacy_blob(b"\0" * 64, 2**34))),
    "truncated": ("checkpoint", lambda p, m: p.write_bytes(PRETRAINED.read_bytes()[:50_000])),
    "zero bytes": ("not a PyTorch checkpoint", lambda p, m: p.write_bytes(b"")),
    "random bytes": ("checkpoint", lambda p, m: p.write_bytes(os.urandom(5000))),
    "a data pickle as checkpoint": ("not a PyTorch checkpoint", lambda p, m: dump(p, GOOD)),
    "arch that is not a name": ("unknown architecture", lambda p, m: torch.save(
        {"model_state_dict": base_state(), "arch": 123}, p)),
    "arch of 5,000 digits": ("refused", lambda p, m: torch.save({"model_state_dict": base_state(), "arch": 10**5000}, p)),
    "arch of 5,000 digits, legacy": ("unknown architecture a number of about 5,000 digits", lambda p, m: torch.save(
        {"model_state_dict": base_state(), "arch": 10**5000}, p, _use_new_zipfile_serialization=False)),
    "legacy format holding Parameters": ("ok", lambda p, m: state_dict_file(
        p, {k: torch.nn.Parameter(v) for k, v in base_state().items()}, legacy=True)),
    "legacy file setting the state of torch.FloatStorage": ("it sets the state of a _StorageType", lambda p, m: p.write_bytes(
        legacy_prefix() + b"\x80\x02ctorch\nFloatStorage\n}X\x05\x00\x00\x00dtypeK\x05sb." + pickle.dumps([], protocol=2))),
    "zip entry flagged encrypted": ("encrypted or patched", lambda p, m: p.write_bytes(zip_flags(0x1))),
    "zip entry flagged patched": ("encrypted or patched", lambda p, m: p.write_bytes(zip_flags(0x20))),
    "zip entry name not UTF-8": ("checkpoint", lambda p, m: p.write_bytes(zip_flags(0x800, bad_name=True))),
    "legacy Parameter with a hook": ("hooks", lambda p, m: state_dict_file(
        p, {**base_state(), "fc3.bias": Call(torch._utils._rebuild_parameter, base_state()["fc3.bias"], True,
                                              collections.OrderedDict([(1, 2)]))},
        legacy=True)),
    "legacy OrderedDict given an items attribute": ("attributes of a dict", lambda p, m: p.write_bytes(
        legacy_prefix() + b"\x80\x02ccollections\nOrderedDict\n)R}X\x05\x00\x00\x00itemsK\x01sb."
        + pickle.dumps([], protocol=2))),
    "zip state_dict whose items method is shadowed": ("attributes of a dict", lambda p, m: torch.save(
        {"model_state_dict": shadowed(base_state(), items=5)}, p)),
    "another network's weights": ("missing keys", lambda p, m: torch.save({"model_state_dict": {"w": torch.zeros(2)}}, p)),
    # torch.load(weights_only=True) reads what follows without limit: each is refused before it runs.
    "zip dict of 3,000 keys sharing one hash": ("a dict has the key 2305843009213693951", lambda p, m: p.write_bytes(
        zip_holding(same_hash_keys(3000)))),
    "zip pickle decoding hex": ("codec 'hex'", lambda p, m: p.write_bytes(zip_holding(pickle.dumps(
        Call(codecs.encode, "00" * 1000, "hex"), protocol=2)))),
    "zip pickle of a million empty sets": ("builds a set", lambda p, m: p.write_bytes(zip_holding(
        b"\x80\x04" + b"\x8f" * 2**20 + b"."))),
    "zip pickle of a million empty dicts": ("more pickle instructions", lambda p, m: p.write_bytes(zip_holding(
        b"\x80\x04" + b"}" * 2**20 + b"."))),
    "float8 weights": ("torch._utils._rebuild_tensor_v3", lambda p, m: state_dict_file(
        p, with_tensor("fc1.weight", lambda t: t.to(torch.float8_e4m3fn)))),
    "zip with data.pkl twice": ("two entries of the same name", lambda p, m: p.write_bytes(zip_holding(
        pickle.dumps({}, protocol=2), data_pkl_twice=True))),
    "zip whose first entry is in another folder": ("one folder holding data.pkl", lambda p, m: p.write_bytes(
        zip_holding(pickle.dumps({}, protocol=2), first="other/data.pkl"))),
    "zip storage record shorter than declared": ("storage 0 declares 1,200 torch.float32 elements but its record "
                                                 "holds 100 bytes", lambda p, m: p.write_bytes(with_short_record("0"))),
    "zip storage record missing": ("storage 0 declares 1,200 torch.float32 elements but its record holds no bytes",
                                   lambda p, m: p.write_bytes(zip_holding(shipped_pickle_and_records()[0]))),
    "zip as written by torch.save, rebuilt": ("ok", lambda p, m: p.write_bytes(zip_holding(
        *shipped_pickle_and_records()))),
    # torch.load reads a copy of the entries checked, never the file's second archive (a set here).
    "zip hiding a second archive for torch's reader": ("ok", lambda p, m: p.write_bytes(two_archives_in_one(
        pickle.dumps({1, 2, 3}, protocol=2)))),
    "zip OrderedDict built from a list of items": ("builds an OrderedDict from a list of items", lambda p, m: (
        p.write_bytes(zip_holding(pickle.dumps(Call(collections.OrderedDict, [(1, 2)]), protocol=2))))),
}


def write_checkpoint_case(d, name, marker):
    write = CHECKPOINT_CASES[name][1]
    if write is None:
        return PRETRAINED
    path = d / f"ckpt {len(list(d.iterdir()))}.ckpt"
    write(path, marker)
    return path


LOADER = """
import json, sys
from cli import UserError
from dataset import load_pickle
from models import load_model
load = {"data": load_pickle, "checkpoint": load_model}[sys.argv[1]]
results = {}
for path in sys.argv[2:]:
    try:
        load(path)
        results[path] = "ok"
    except UserError as e:
        results[path] = "refused: " + str(e)
    except BaseException as e:
        results[path] = f"CRASH {type(e).__name__}: {e}"[:300]
print(json.dumps(results))
"""


def load_all(kind, files, tmp):
    result = subprocess.run([sys.executable, "-c", LOADER, kind, *(str(p) for p, _ in files.values())],
                            cwd=tmp, capture_output=True, text=True, timeout=600, preexec_fn=limited(),
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
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


def check_outcome(crafted, kind, case):
    files, results = crafted[kind]
    path, expected = files[case]
    outcome = results[str(path)]
    assert not crafted["marker"].exists(), "a payload ran"
    if expected == "ok":
        assert outcome == "ok", outcome
    else:
        assert outcome.startswith("refused: "), outcome
        message = outcome[len("refused: "):]
        assert "\n" not in message and str(path) in message and expected in message, message
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
    result = run("tester.py", "--checkpoint", PRETRAINED, "--data", path, "--out", tmp_path, cwd=tmp_path)
    assert_one_line(result, str(path), expected)


@pytest.mark.parametrize("script", ["tester.py", "adversarialExample.py"])
@pytest.mark.parametrize("case", ["NaN weights", "corrupted middle", "os.system payload (zip)"])
def test_scripts_refuse_hostile_checkpoints_in_one_line(crafted, script, case, tmp_path):
    path, expected = crafted["checkpoint"][0][case]
    result = run(script, "--checkpoint", path, "--data", crafted["data"][0]["valid, protocol 2"][0],
                 "--out", tmp_path, cwd=tmp_path)
    assert_one_line(result, str(path), expected)
    assert not crafted["marker"].exists()


# ---------------------------------------------------------------------------
# Files that are not regular files: refused at once, never read (a FIFO would block forever)


@pytest.fixture
def fifo(tmp_path):
    path = tmp_path / "fifo"
    os.mkfifo(path)
    return path


FIFO_CASES = {
    "tester --checkpoint": ("tester.py", ["--checkpoint", "FIFO"]),
    "tester --data": ("tester.py", ["--checkpoint", PRETRAINED, "--data", "FIFO"]),
    "adversarialExample --checkpoint": ("adversarialExample.py", ["--checkpoint", "FIFO"]),
    "trainer --fix-labels": ("trainer.py", ["--fix-labels", "FIFO", "--out", "m.ckpt", "--figures", "fig"]),
    "trainer --data": ("trainer.py", ["--data", "FIFO", "--dev-data", PRETRAINED, "--out", "m.ckpt",
                                      "--figures", "fig"]),
}


@pytest.mark.parametrize("case", list(FIFO_CASES))
def test_fifo_inputs_are_refused_without_blocking(case, fifo, tmp_path):
    script, args = FIFO_CASES[case]
    result = run(script, *[fifo if a == "FIFO" else a for a in args], cwd=tmp_path, timeout=60)
    assert_one_line(result, str(fifo), "not a regular file")


def test_device_file_and_folder_are_refused(tmp_path):
    result = run("tester.py", "--checkpoint", "/dev/zero", cwd=tmp_path, timeout=60)
    assert_one_line(result, "/dev/zero", "not a regular file")
    # A folder is read as images sorted into class subfolders (tests/test_own_photos.py); this one has none.
    result = run("tester.py", "--checkpoint", PRETRAINED, "--data", tmp_path, cwd=tmp_path, timeout=60)
    assert_one_line(result, str(tmp_path), "no class subfolder car/")


# ---------------------------------------------------------------------------
# Flags: validated up front, one line naming the flag and the allowed range

FLAG_CASES = [
    ("trainer.py", ["--lr", "nan"], "--lr"),
    ("trainer.py", ["--lr", "-1"], "--lr"),
    ("trainer.py", ["--lr", "inf"], "--lr"),
    ("trainer.py", ["--lr-sweep", "nan", "1e-3"], "--lr-sweep"),
    ("trainer.py", ["--lr-sweep", "1e-3", "inf"], "--lr-sweep"),
    ("trainer.py", ["--weight-decay", "-1"], "--weight-decay"),
    ("trainer.py", ["--label-smoothing", "2"], "--label-smoothing"),
    ("trainer.py", ["--label-smoothing", "-0.5"], "--label-smoothing"),
    ("trainer.py", ["--repair-folds", "10000"], "--repair-folds"),
    ("trainer.py", ["--repair-folds", "1"], "--repair-folds"),
    ("trainer.py", ["--seed", "-1"], "--seed"),
    ("trainer.py", ["--seed", str(2**70)], "--seed"),
    ("trainer.py", ["--epochs", "0"], "--epochs"),
    ("trainer.py", ["--epochs", "1.5"], "--epochs"),
    ("trainer.py", ["--batch-size", "0"], "--batch-size"),
    ("trainer.py", ["--sweep-steps", "-3"], "--sweep-steps"),
    ("trainer.py", ["--model", "vit"], "--model"),
    ("trainer.py", ["--device", "meta"], "--device"),
    ("trainer.py", ["--device", "mps"], "--device"),
    ("trainer.py", ["--device", "xpu"], "--device"),
    ("trainer.py", ["--device", "cuda:7"], "--device"),
    ("trainer.py", ["--device", "cpu:1"], "--device"),
    # Imbalance treatments and adversarial training
    ("trainer.py", ["--tau", "nan"], "--tau"),
    ("trainer.py", ["--tau", "-1"], "--tau"),
    ("trainer.py", ["--drw-start", "-1"], "--drw-start"),
    ("trainer.py", ["--drw-start", "61"], "--drw-start"),
    ("trainer.py", ["--drw-start", "5", "--sampler", "none"], "--drw-start"),
    ("trainer.py", ["--mix", "cutout"], "--mix"),
    ("trainer.py", ["--mix-alpha", "0"], "--mix-alpha"),
    ("trainer.py", ["--mix-alpha", "inf"], "--mix-alpha"),
    ("trainer.py", ["--ema", "1"], "--ema"),
    ("trainer.py", ["--ema", "nan"], "--ema"),
    ("trainer.py", ["--val-fraction", "0.5"], "--val-fraction"),
    ("trainer.py", ["--select", "best-val"], "--select"),
    ("trainer.py", ["--loss", "focal"], "--loss"),
    ("trainer.py", ["--sampler", "inverse"], "--sampler"),
    ("trainer.py", ["--repair-model", "resnet8"], "--repair-model"),
    ("trainer.py", ["--repair-epochs", "0"], "--repair-epochs"),
    ("trainer.py", ["--adversarial", "cw"], "--adversarial"),
    ("trainer.py", ["--adv-epsilon", "0"], "--adv-epsilon"),
    ("trainer.py", ["--adv-epsilon", "8/0"], "--adv-epsilon"),
    ("trainer.py", ["--adv-epsilon", "1e999"], "--adv-epsilon"),
    ("trainer.py", ["--adv-steps", "0"], "--adv-steps"),
    ("trainer.py", ["--adv-step-size", "-1"], "--adv-step-size"),
    ("trainer.py", ["--robust-eval", "-1"], "--robust-eval"),
    ("adversarialExample.py", ["--restarts", "0"], "--restarts"),
    ("tester.py", ["--batch-size", "-1"], "--batch-size"),
    ("tester.py", ["--tta", "rotate"], "--tta"),
    ("tester.py", ["--device", "banana"], "--device"),
    ("adversarialExample.py", ["--seed", str(2**70)], "--seed"),
    ("adversarialExample.py", ["--epsilons", "nan"], "--epsilons"),
    ("adversarialExample.py", ["--epsilons", "0.1", "-0.1"], "--epsilons"),
    ("adversarialExample.py", ["--epsilons", "2"], "--epsilons"),
    ("adversarialExample.py", ["--example-epsilon", "inf"], "--example-epsilon"),
    ("adversarialExample.py", ["--steps", "0"], "--steps"),
    ("adversarialExample.py", ["--step-size", "0"], "--step-size"),
    ("adversarialExample.py", ["--examples", "-1"], "--examples"),
    ("adversarialExample.py", ["--batch-size", "0"], "--batch-size"),
    ("dataset.py", ["build", "--seed", "-1"], "--seed"),
    ("dataset.py", ["build", "--train-counts", "-1", "1", "1"], "--train-counts"),
    ("dataset.py", ["build", "--mislabeled", "999999"], "--mislabeled"),
    ("dataset.py", ["build", "--dev-counts", "1", "2"], "--dev-counts"),
    ("dataset.py", ["frobnicate"], "frobnicate"),
]


@pytest.mark.parametrize("script,args,flag", FLAG_CASES, ids=[f"{s} {' '.join(a)}" for s, a, _ in FLAG_CASES])
def test_bad_flag_is_one_line_naming_it(script, args, flag, tmp_path):
    result = run(script, *args, cwd=tmp_path, timeout=60)
    assert_one_line(result, flag)
    assert list(tmp_path.iterdir()) == [], "a refused run wrote files"


HUGE = "9" * 5000
# (script, args, the flag the line names): each value thousands of characters long
HUGE_FLAG_CASES = {
    "--epochs of 5,000 digits": ("trainer.py", ["--epochs", HUGE], "--epochs"),
    "--seed of 4,000 digits": ("trainer.py", ["--seed", HUGE[:4000]], "--seed"),
    "--lr of 5,000 digits": ("trainer.py", ["--lr", HUGE], "--lr"),
    "--model of 5,000 letters": ("trainer.py", ["--model", "x" * 5000], "--model"),
    "an unknown flag of 5,000 letters": ("trainer.py", ["--" + "x" * 5000], "unrecognized arguments"),
    "--device of 5,000 letters": ("tester.py", ["--device", "x" * 5000], "--device"),
    "--epsilons of 5,000 digits": ("adversarialExample.py", ["--epsilons", "1/" + HUGE], "--epsilons"),
    "--mislabeled of 5,000 digits": ("dataset.py", ["build", "--mislabeled", HUGE], "--mislabeled"),
}


@pytest.mark.parametrize("case", list(HUGE_FLAG_CASES))
def test_a_huge_flag_value_is_not_repeated_in_full(case, tmp_path):
    script, args, flag = HUGE_FLAG_CASES[case]
    result = run(script, *args, cwd=tmp_path, timeout=60)
    assert_one_line(result, flag)
    assert len(result.stderr) < 400, result.stderr[:400]


# ---------------------------------------------------------------------------
# Outputs: checked before any work


def test_outputs_that_cannot_be_written_are_refused_before_any_work(tmp_path):
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    a_dir = tmp_path / "a_dir"
    a_dir.mkdir()
    cases = [
        ("trainer.py", ["--out", a_dir], "--out", "is a folder"),
        ("trainer.py", ["--out", a_file / "m.ckpt"], "--out", "is a file"),
        ("trainer.py", ["--figures", a_file], "--figures", "is a file"),
        ("tester.py", ["--out", a_file], "--out", "is a file"),
        ("adversarialExample.py", ["--checkpoint", PRETRAINED, "--out", a_file / "x"], "--out", "is a file"),
        ("dataset.py", ["insights", "--figures", a_file], "--figures", "is a file"),
    ]
    for script, args, flag, words in cases:
        start = time.time()
        result = run(script, *args, "--data", tmp_path / "missing.pickle", cwd=tmp_path, timeout=60) \
            if script != "dataset.py" else run(script, *args, cwd=tmp_path, timeout=60)
        assert_one_line(result, flag, words)
        assert time.time() - start < 30


@needs_cifar
def test_build_into_a_file_is_refused(tmp_path):
    from conftest import cifar_dir

    (tmp_path / "data").write_text("x")
    result = run("dataset.py", "build", "--cifar-dir", cifar_dir(), "--out-dir", tmp_path / "data", cwd=tmp_path)
    assert_one_line(result, "--out-dir", "is a file")


def test_full_disk_mid_run_is_one_line_and_keeps_the_checkpoint(small_data, tmp_path):
    # Writes past 600 KB fail (EFBIG, as a full disk would fail them): the checkpoint (268 KB)
    # fits, the resume state (model plus Adam's moments, about 800 KB) does not.
    out = tmp_path / "m.ckpt"
    result = run("trainer.py", "--data", small_data / "train.pickle", "--dev-data", small_data / "dev.pickle",
                 "--epochs", "2", "--fix-labels", "none", "--out", out, "--figures", tmp_path / "fig",
                 cwd=tmp_path, file_size=600_000, timeout=300)
    assert_refused(result, "m.resume.pt", "cannot write")
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
    "fractional index": ([{"index": 1.9, "label": "cat"}], "index 1.9"),
    "fractional label": ([{"index": 1, "label": 2.7}], "label 2.7"),
    "boolean label": ([{"index": 1, "label": True}], "label true"),
    "boolean index": ([{"index": True, "label": "cat"}], "index true"),
    "duplicate index": ([{"index": 4, "label": "cat"}, {"index": 4, "label": "car"}], "both correct image 4"),
    "index out of range": ([{"index": 10**9, "label": "cat"}], "index 1000000000"),
    "unknown label name": ([{"index": 1, "label": "horse"}], "label \"horse\""),
    "missing key": ([{"index": 1}], "exactly the keys"),
    "not a list": ({"index": 1, "label": "cat"}, "expected a list"),
    "not JSON": ("[{index: 1}]", "not valid JSON"),
    "deeply nested": ("[" * 100_000 + "]" * 100_000, "not valid JSON"),
    "index of 5,000 digits": ('[{"index": ' + "9" * 5000 + ', "label": "cat"}]', "not valid JSON"),
    "index of 4,000 digits": ('[{"index": ' + "9" * 4000 + ', "label": "cat"}]', "index a number of about 4,000 digits"),
    "label of 5,000 digits": ('[{"index": 1, "label": ' + "7" * 5000 + "}]", "not valid JSON"),
    "label of 4,000 digits": ('[{"index": 1, "label": ' + "7" * 4000 + "}]", "label a number of about 4,000 digits"),
    "label nested 100 deep": ('[{"index": 1, "label": ' + "[" * 100 + "]" * 100 + "}]", "label a list of 1 items"),
    "label a megabyte long": ([{"index": 1, "label": "x" * 2**20}], "(1,048,576 characters)"),
    "a key given twice": ('[{"index": 3, "label": "truck", "index": 5}]', "the key 'index' appears twice"),
    "larger than corrections of its images take": ("[" + " " * 2**21 + "]", "2,097,154 bytes, more than"),
}


@pytest.mark.parametrize("case", list(FIX_CASES))
def test_bad_corrections_file_is_refused(case, tmp_path):
    import label_repair
    from cli import UserError

    content, words = FIX_CASES[case]
    with pytest.raises(UserError) as info:
        label_repair.read_corrections(corrections(tmp_path, content), 100)
    assert words in str(info.value) and "\n" not in str(info.value)
    assert len(str(info.value)) < 400  # never the whole value


def test_bad_corrections_file_is_refused_before_training(small_data, tmp_path):
    fixes = corrections(tmp_path, [{"index": 1.9, "label": "cat"}])
    result = run("trainer.py", "--data", small_data / "train.pickle", "--dev-data", small_data / "dev.pickle",
                 "--fix-labels", fixes, "--out", tmp_path / "m.ckpt", "--figures", tmp_path / "fig", cwd=tmp_path)
    assert_one_line(result, "--fix-labels", "index 1.9")
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


@pytest.mark.parametrize("name,words", [("two_trucks", "truck 2"), ("one_image", "truck 0")])
def test_too_few_images_for_repair_folds_is_refused_with_a_way_out(lopsided, name, words, tmp_path):
    result = run("trainer.py", "--data", lopsided / f"{name}.pickle", "--dev-data", lopsided / "dev.pickle",
                 "--fix-labels", "auto", "--out", tmp_path / "m.ckpt", "--figures", tmp_path / "fig", cwd=tmp_path)
    assert_one_line(result, words, "--fix-labels none", "--repair-folds")


def test_missing_class_trains_with_a_one_line_warning(lopsided, tmp_path):
    result = run("trainer.py", "--data", lopsided / "no_trucks.pickle", "--dev-data", lopsided / "dev.pickle",
                 "--fix-labels", "none", "--epochs", "1", "--out", tmp_path / "m.ckpt", "--figures", tmp_path / "f",
                 cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    warnings = [line for line in result.stderr.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and "no truck images" in warnings[0]


# ---------------------------------------------------------------------------
# Interruptions and concurrency


def test_ctrl_c_during_label_repair_says_so(small_data, tmp_path):
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "trainer.py"), "--data", small_data / "train.pickle", "--dev-data",
         small_data / "dev.pickle", "--fix-labels", "auto", "--repair-epochs", "200", "--out", tmp_path / "m.ckpt",
         "--figures", tmp_path / "fig"],
        cwd=tmp_path, stderr=subprocess.PIPE, text=True, preexec_fn=limited(),
        env={**os.environ, "MPLBACKEND": "Agg", "PYTHONUNBUFFERED": "1"})
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
    last = stderr.strip().splitlines()[-1]
    assert ": error: " in last and "label repair" in last and "--fix-labels none" in last


def test_second_trainer_on_the_same_output_stops_with_one_line(small_data, tmp_path):
    import fcntl

    out = tmp_path / "m.ckpt"
    with open(f"{out}.lock", "a+b") as held:  # what a running trainer.py holds
        fcntl.flock(held.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        result = run("trainer.py", "--data", small_data / "train.pickle", "--dev-data", small_data / "dev.pickle",
                     "--fix-labels", "none", "--out", out, "--figures", tmp_path / "fig", cwd=tmp_path)
    assert_one_line(result, "another run is writing it")
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
    assert_one_line(result, "--resume", "has changed")


def test_tampered_resume_state_with_nan_weights_is_refused(small_data, tmp_path):
    common = ["--data", small_data / "train.pickle", "--dev-data", small_data / "dev.pickle", "--fix-labels",
              "none", "--epochs", "1", "--out", tmp_path / "m.ckpt", "--figures", tmp_path / "fig"]
    assert run("trainer.py", *common, cwd=tmp_path).returncode == 0
    state_path = tmp_path / "m.resume.pt"
    state = torch.load(state_path, weights_only=True)
    state["model"]["fc2.weight"].fill_(float("nan"))
    torch.save(state, state_path)
    result = run("trainer.py", *common, "--resume", cwd=tmp_path)
    assert_refused(result, "fc2.weight", "NaN")


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


# name -> (words of the one-line refusal, or "ok"; the change)
RESUME_CASES = {
    "untouched": ("ok", None),
    "keep as a list": ("keep is a list", tamper("keep", lambda keep: keep.tolist())),
    "keep as integer indices": ("keep is a torch.int64 tensor", tamper("keep", lambda keep: keep.nonzero().flatten())),
    "keep drops every image": ("keeps no image", tamper("keep", torch.zeros_like)),
    "labels shorter than the data": ("labels is a torch.int64 tensor of shape [10]",
                                     tamper("labels", lambda labels: labels[:10])),
    "a label 7": ("labels holds values other than", tamper("labels", lambda labels: labels.index_fill(0, torch.tensor([3]), 7))),
    "float labels": ("labels is a torch.float32 tensor", tamper("labels", lambda labels: labels.float())),
    "epoch 0": ("epoch 0 is not one of 1 to 2", tamper("epoch", lambda e: 0)),
    "epoch past the run": ("epoch 9 is not one of 1 to 2", tamper("epoch", lambda e: 9)),
    "epoch as text": ("epoch '1' is not one of", tamper("epoch", lambda e: "1")),
    "epoch of 5,000 digits": ("Unsupported operand", tamper("epoch", lambda e: 10**5000)),  # torch refuses it
    "epoch of 40 digits": ("epoch a number of about 40 digits is not", tamper("epoch", lambda e: 10**40)),
    "best of the wrong type": ("best is 'epoch 1'", tamper("best", lambda best: "epoch 1")),
    "best scoring what no epoch scored": ("best is a dict", tamper("best", lambda best: {**best, "score": 0.99})),
    "best from a later epoch": ("best is a dict", tamper("best", lambda best: {**best, "epoch": 2})),
    "history too short": ("history is a list of 0 items", tamper("history", lambda history: [])),
    "history with NaN accuracy": ("history [0] dev balanced_accuracy is nan", tamper("history", first_epoch(
        lambda h: {**h, "dev": {**h["dev"], "balanced_accuracy": float("nan")}}))),
    "history with accuracy 7": ("from 0 to 1", tamper("history", first_epoch(
        lambda h: {**h, "dev": {**h["dev"], "accuracy": 7.0}}))),
    "history with a string loss": ("history [0] is a dict", tamper("history", first_epoch(lambda h: {**h, "loss": "0.5"}))),
    "history of another epoch": ("is not epoch 1's record", tamper("history", first_epoch(lambda h: {**h, "epoch": 5}))),
    "other learning rate": ("other settings (lr)", tamper("config", set_item("lr", 0.5))),
    "a tensor among the settings": ("other settings (seed)", tamper("config", set_item("seed", torch.zeros(3)))),
    "data fingerprint of the wrong type": ("has changed", tamper("data_sha256", lambda sha: 12345)),
    "missing key": ("is not a resume state", None),
    "weights that are not a state_dict": ("expected a state_dict", tamper("model", lambda model: None)),
    "average missing": ("average is missing", tamper("average", lambda average: None)),
    "NaN in the average": ("(average): tensor fc1.weight holds NaN", tamper("average", set_item(
        "fc1.weight", torch.full((120, 400), float("nan"))))),
    "NaN in Adam's moments": ("optimizer state 0 exp_avg holds NaN", tamper("optimizer", in_optimizer_state(
        "exp_avg", lambda t: torch.full_like(t, float("nan"))))),
    "Adam's moments of the wrong shape": ("optimizer state 0 exp_avg_sq is a torch.float32 tensor of shape [3]",
                                          tamper("optimizer", in_optimizer_state("exp_avg_sq", lambda t: torch.zeros(3)))),
    "state of a parameter that does not exist": ("optimizer state 99 is not", tamper("optimizer", lambda o: {
        **o, "state": {**o["state"], 99: o["state"][0]}})),
    "NaN learning rate": ("optimizer param_groups [0] lr is nan", tamper("optimizer", lambda o: {
        **o, "param_groups": [{**o["param_groups"][0], "lr": float("nan")}]})),
    "other weight decay": ("param_groups [0] weight_decay is 0.5", tamper("optimizer", lambda o: {
        **o, "param_groups": [{**o["param_groups"][0], "weight_decay": 0.5}]})),
    "other epsilon": ("param_groups hold other settings", tamper("optimizer", lambda o: {
        **o, "param_groups": [{**o["param_groups"][0], "eps": 0.5}]})),
    "schedule at another step": ("scheduler stands at step 3", tamper("scheduler", set_item("last_epoch", 3))),
    "schedule of another length": ("scheduler has other settings", tamper("scheduler", set_item("total_steps", 7))),
    "schedule as a list": ("scheduler is a list", tamper("scheduler", lambda s: [s])),
    "labels on the meta device": ("refers to torch._utils._rebuild_meta_tensor_no_storage", tamper(
        "labels", lambda labels: torch.zeros_like(labels, device="meta"))),
    "sparse keep mask": ("refers to torch._utils._rebuild_sparse_tensor", tamper("keep", lambda keep: keep.to_sparse())),
    "Adam state without its moments": ("optimizer state 0 is not the state", tamper("optimizer", lambda o: {
        **o, "state": {**o["state"], 0: {"step": o["state"][0]["step"]}}})),
    "Adam's second moment negative": ("exp_avg_sq holds negative values", tamper("optimizer", in_optimizer_state(
        "exp_avg_sq", lambda t: -torch.ones_like(t)))),
    "Adam's step count off": ("state 0 step counts 1 steps", tamper("optimizer", in_optimizer_state(
        "step", lambda t: torch.ones_like(t)))),
    "Adam state of one parameter dropped": ("optimizer state covers 9 of this model's 10 parameters", tamper(
        "optimizer", lambda o: {**o, "state": {k: v for k, v in o["state"].items() if k != 3}})),
    "settings whose get method is shadowed": ("attributes of a dict", tamper("config", lambda config: shadowed(config, get=5))),
    "learning rate 1000": ("param_groups lr is 1000.0, not the", tamper("optimizer", lambda o: {
        **o, "param_groups": [{**o["param_groups"][0], "lr": 1000.0}]})),
    "Adam's beta2 set to 1": ("param_groups betas is (", tamper("optimizer", lambda o: {
        **o, "param_groups": [{**o["param_groups"][0], "betas": (o["param_groups"][0]["betas"][0], 1.0)}]})),
    "best score as a tensor": ("best is a dict", tamper("best", lambda best: {
        **best, "score": torch.tensor([best["score"]] * 2)})),
    "best score and its history raised to 1.0": ("best says epoch 1 scored 1.0000 on the validation split, but", None),
    "labels changed under --fix-labels none": ("labels differ from what --fix-labels none gives", tamper(
        "labels", lambda labels: (labels + 1) % 3)),
    "one image dropped under --fix-labels none": ("keep differs from what --fix-labels none gives", tamper(
        "keep", lambda keep: keep.index_fill(0, torch.tensor([5]), False))),
    "schedule flagged as not yet stepped": ("scheduler _is_initial is True, not what this run's schedule has",
                                            tamper("scheduler", set_item("_is_initial", True))),
    "not a dict": ("is not a resume state", None),
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
        assert_one_line(result, words)
        assert len(result.stderr) < 600


def test_torch_running_out_of_memory_is_one_line(capsys):
    import cli

    def allocate():  # what torch's CPU allocator raises when the system refuses
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:117] data. DefaultCPUAllocator: can't allocate memory: "
                           "you tried to allocate 68719476736 bytes. Error code 12 (Cannot allocate memory)")

    with pytest.raises(SystemExit) as stopped:
        cli.run_main(allocate)
    assert stopped.value.code == 1 and "error: out of memory" in capsys.readouterr().err

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
    with pytest.raises(UserError, match="fc1.weight has dtype torch.float8_e4m3fn, not one a model trains in"):
        check_state_dict(SimpleModel(), state, "m.ckpt")


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
    assert "state 0 has no momentum buffer after 1 steps" in _optimizer_problem(saved, optimizer, 1, settings)
