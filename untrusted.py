"""Reading files that may come from anyone: no code runs, nothing runs away, nothing hangs.

Every data pickle, checkpoint, resume state and image file crosses this boundary:

* the torch-version gate: torch.load(weights_only=True) is only trusted on a torch without
  known bypasses;
* read_input_file: regular files only (a FIFO or /dev/zero would block or never end);
* a restricted unpickler that resolves only allowlisted globals, with a budget that keeps
  what a file makes the loader materialize within the file's own size;
* a bounded reader of torch's legacy (non-zip) serialization, whose storages may not claim
  more bytes than the file holds;
* zip checkpoints: stored entries only, claimed sizes within the file, checksums valid, then
  torch.load(weights_only=True);
* checkpoint contents: a state_dict of finite, plain tensors that fits the model.

What a file means (the course's list of (image, label), a resume state) is checked by the
module named for it (dataset.py, resume_state.py); this one guarantees that reading it is safe.
"""
import codecs
import collections
import io
import math
import os
import pickle
import re
import stat
import struct
import warnings
import zipfile
from pathlib import Path

import torch

from cli import MissingFile, UserError, clip, one_line

# torch.load(weights_only=True) is the boundary every zip checkpoint crosses. It had published
# bypasses up to 2.9: CVE-2025-32434 (code execution, fixed in 2.6.0) and CVE-2026-24747
# (memory corruption from crafted SETITEM opcodes or storage sizes, fixed in 2.10.0).
MIN_SAFE_TORCH = (2, 10)
ZIP_MAGIC = b"PK\x03\x04"


def torch_version_tuple(version):
    """(major, minor) of a version string such as '2.14.1+cu128'."""
    match = re.match(r"(\d+)\.(\d+)", str(version))
    return (int(match[1]), int(match[2])) if match else (0, 0)


def require_safe_torch():
    """Refuse to run on a torch whose safe loader has known bypasses."""
    if torch_version_tuple(torch.__version__) < MIN_SAFE_TORCH:
        need = ".".join(map(str, MIN_SAFE_TORCH))
        raise UserError(
            f"torch {torch.__version__} is too old to load files safely (its weights_only loader has known "
            f"bypasses: CVE-2025-32434, CVE-2026-24747); upgrade to torch >= {need}: "
            "pip install -r requirements.txt"
        )


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


def describe(value):
    """value in a few words for an error message, whatever a file put there: a number of 5,000
    digits, a string of megabytes or a list nested 200,000 deep is described, never printed
    in full and never walked."""
    if value is None or isinstance(value, (bool, float)):
        return repr(value)
    if isinstance(value, int):
        if value.bit_length() > 128:  # str() of a huge int is slow, and refused past 4,300 digits
            return f"a number of about {round(value.bit_length() * math.log10(2)):,} digits"
        return str(value)
    if isinstance(value, (str, bytes)):
        return repr(clip(value) if isinstance(value, str) else value[:40])
    if isinstance(value, torch.Tensor):
        return f"a {value.dtype} tensor of shape {list(value.shape)}"
    if isinstance(value, (list, tuple, dict, set)):
        return f"a {type(value).__name__} of {len(value):,} items"
    name = {"PickledArray": "numpy array", "PickledDataset": "MyDataset"}.get(type(value).__name__,
                                                                           type(value).__name__)
    return f"{'an' if name[0] in 'aeiou' else 'a'} {name}"


# ---------------------------------------------------------------------------
# The restricted unpickler and its budget


class UnsafeFile(Exception):
    """A file that names something it may not (code, an unknown type) or claims more than it holds."""


class NotTorchFormat(UnsafeFile):
    """Bytes that do not start the way torch's legacy serialization does."""


class RestrictedUnpickler(pickle._Unpickler):
    """Python's own (pure-Python) unpickler, with three limits:

    * find_class resolves only allowlisted globals;
    * every opcode is charged OPCODE_COST bytes against the size of the data it reads (or
      OPCODE_FLOOR, for small files), so the Python objects a file builds (an empty set is 216
      bytes) stay within that size: a file of a million one-byte opcodes is refused instead of
      taking hundreds of megabytes;
    * BUILD (set an object's state) works only on the stand-ins below, which check what they
      are given: on a tensor it would resize its storage, on a shared object it would change
      it for every later load.

    The pure-Python unpickler keeps its memo in a dict and reads what a BINBYTES opcode
    declares only as far as the data goes; the C one grows its memo to any index a file names
    and reserves any declared length first. encoding="bytes" reads Python 2's strings as bytes
    (CIFAR-10's batches were written by Python 2).
    """

    OPCODE_COST, OPCODE_FLOOR = 256, 2**20
    dispatch = dict(pickle._Unpickler.dispatch)

    def __init__(self, file, allowed, what, size, persistent_load=None, encoding="ASCII"):
        super().__init__(file, encoding=encoding)
        self.allowed, self.what = allowed, what
        self.opcodes_left = max(size, self.OPCODE_FLOOR) // self.OPCODE_COST
        if persistent_load is not None:
            self.persistent_load = persistent_load

    def find_class(self, module, name):
        # ("*", name) allows a class of that name from any module: a course MyDataset may have been
        # defined in the student's own script (__main__) as well as in dataset.py.
        for key in ((module, name), ("*", name)):
            if key in self.allowed:
                return self.allowed[key]
        raise UnsafeFile(f"it refers to {clip(module)}.{clip(name)}, which a {self.what} never holds "
                         "(loading it could run code)")

    def load_build(self):
        target, state = self.stack[-2], self.stack[-1]
        if not isinstance(target, _BUILDABLE):
            raise UnsafeFile(f"it sets the state of {describe(target)}, which a {self.what} never does")
        # An OrderedDict's only state is a state_dict's _metadata; any other attribute could
        # shadow its methods (.items, .get) for the code that reads the file.
        if type(target) is collections.OrderedDict and not (type(state) is dict and set(state) <= {"_metadata"}):
            raise UnsafeFile("it sets attributes of a dict other than a state_dict's _metadata")
        super().load_build()

    dispatch[pickle.BUILD[0]] = load_build

    def load_bytearray8(self):
        # pickle's own allocates the declared length before reading: 10 bytes could demand 1 GiB.
        (n,) = struct.unpack("<Q", self.read(8))
        data = self.read(n)
        if len(data) != n:
            raise UnsafeFile(f"a byte array declares {n:,} bytes but the {self.what} holds only {len(data):,}")
        self.append(bytearray(data))

    dispatch[pickle.BYTEARRAY8[0]] = load_bytearray8

    def load(self):
        """pickle._Unpickler.load, charging each opcode to the file's size."""
        self._unframer = pickle._Unframer(self._file_read, self._file_readline)
        self.read, self.readinto, self.readline = self._unframer.read, self._unframer.readinto, self._unframer.readline
        self.metastack, self.stack, self.proto = [], [], 0
        self.append = self.stack.append
        read, dispatch = self.read, self.dispatch
        try:
            while True:
                key = read(1)
                if not key:
                    raise EOFError
                self.opcodes_left -= 1
                if self.opcodes_left < 0:
                    raise UnsafeFile(f"it holds more pickle instructions than a {self.what} of its size does "
                                     "(they would build more objects than the file holds)")
                dispatch[key[0]](self)
        except pickle._Stop as stop:
            return stop.value


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
MAX_TENSOR_DIMS = 8
# No shape, stride or offset in a real file comes near this; a bigger number (a pickle may hold
# one of millions of digits) would make the bounds arithmetic itself take minutes.
MAX_LAYOUT_NUMBER = 2**62


def layout_number(value):
    """A whole number that may be a shape, stride or offset: from 0 to MAX_LAYOUT_NUMBER."""
    return whole(value) and 0 <= value <= MAX_LAYOUT_NUMBER


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
_LEGACY_HEADERS = set()  # header bytes (magic, protocol, little-endian system info) already read as valid


def whole(value):
    """A Python int that is not a bool."""
    return isinstance(value, int) and not isinstance(value, bool)


def _rebuild_tensor(storage, offset, size, stride, requires_grad=False, backward_hooks=None, metadata=None):
    """Stands in for torch._utils._rebuild_tensor(_v2): a view of a storage read from the file,
    after checking that every element it reaches lies inside that storage."""
    if not isinstance(storage, _Storage):
        raise UnsafeFile("a tensor is built from something that is not a storage")
    size, stride = tuple(size) if isinstance(size, (tuple, list)) else size, \
        tuple(stride) if isinstance(stride, (tuple, list)) else stride
    if not (isinstance(size, tuple) and isinstance(stride, tuple) and len(size) == len(stride) <= MAX_TENSOR_DIMS
            and all(layout_number(v) for v in (offset, *size, *stride))):
        raise UnsafeFile(f"a tensor has an invalid layout (offset {describe(offset)}, size {describe(size)}, "
                         f"stride {describe(stride)})")
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
        raise UnsafeFile(f"a tensor has requires_grad={describe(requires_grad)}")
    return tensor


def _rebuild_parameter(data, requires_grad, backward_hooks, *state):
    """Stands in for torch._utils._rebuild_parameter(_with_state): a dict saved from
    named_parameters() holds Parameters; their data is the weight, as a plain tensor."""
    if not isinstance(data, torch.Tensor) or not isinstance(requires_grad, bool):
        raise UnsafeFile("a parameter is not built from a tensor")
    if backward_hooks or state and state[0]:
        raise UnsafeFile("a parameter carries autograd hooks or Python attributes")
    return data.detach()


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
        return RestrictedUnpickler(f, {}, what, len(data)).load()

    # A data pickle holds one such blob per image, each starting with the same header: bytes
    # already read as a valid header are skipped instead of unpickled again.
    header = next((h for h in _LEGACY_HEADERS if data.startswith(h)), None)
    if header is not None:
        f.seek(len(header))
    else:
        try:
            torch_format = plain_pickle() == _LEGACY_MAGIC and plain_pickle() == _LEGACY_PROTOCOL
        except Exception:  # anything else at the start of the file
            torch_format = False
        if not torch_format:
            raise NotTorchFormat("not in torch's serialization format")
        info = plain_pickle()
        if not isinstance(info, dict) or info.get("little_endian") is not True:
            raise UnsafeFile("written on a big-endian machine or with unknown system info; not supported")
        # Only a header byte for byte as torch writes it (three protocol-2 pickles, no frames) is
        # remembered: skipping bytes stands for parsing them only when they are exactly that.
        canonical = b"".join(pickle.dumps(v, protocol=2) for v in (_LEGACY_MAGIC, _LEGACY_PROTOCOL, info))
        if data[: f.tell()] == canonical and len(canonical) <= 512 and len(_LEGACY_HEADERS) < 8:
            _LEGACY_HEADERS.add(canonical)
    storages, claimed = {}, 0

    def persistent_load(saved_id):
        nonlocal claimed
        if not (isinstance(saved_id, tuple) and len(saved_id) == 6 and saved_id[0] == "storage"):
            raise UnsafeFile(f"unknown persistent object {describe(saved_id)}")
        _, kind, key, _location, numel, view = saved_id  # location is ignored: data always lands on the CPU
        if not isinstance(kind, _StorageType) or not isinstance(key, str) or not layout_number(numel):
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

    obj = RestrictedUnpickler(f, {**allowed, **{("torch", n): t for n, t in _STORAGE_TYPES.items()}}, what,
                              len(data), persistent_load).load()
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


def _latin1_encode(budget):
    """Stands in for _codecs.encode: pickle protocols 0-2 write bytes as encode(str, 'latin1'); other
    codecs ('hex', 'base64', nested) would let a few bytes expand without bound."""

    def latin1_encode(text, encoding="latin1"):
        if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
            raise UnsafeFile(f"it encodes {type(text).__name__} data with codec {describe(encoding)}")
        budget.take("decoded bytes", len(text))
        return codecs.encode(text, "latin1")

    return latin1_encode


# ---------------------------------------------------------------------------
# numpy arrays and scalars in pickles, and the course's MyDataset: rebuilt as data, never by numpy's
# or the pickled class's own code

# Plain numbers only: an object array ('O') would hold pickled Python objects.
_ARRAY_DTYPES = {"u1", "i1", "u2", "i2", "u4", "i4", "u8", "i8", "b1", "f2", "f4", "f8"}


class _DtypeSpec:
    """Stands in for numpy.dtype(code, align, copy) and its pickled state: a plain number type, checked."""

    def __init__(self, code, align=False, copy=False):
        code = code.decode("latin1") if isinstance(code, bytes) else code
        if not isinstance(code, str) or code not in _ARRAY_DTYPES:
            raise UnsafeFile(f"an array has dtype {describe(code)}, not a plain number type")
        self.code, self.byteorder = code, "|"

    def __setstate__(self, state):
        if not (isinstance(state, tuple) and len(state) == 8 and all(v is None for v in state[2:5])):
            raise UnsafeFile("an array's dtype has a structure (fields or subarrays)")
        order = state[1].decode("latin1") if isinstance(state[1], bytes) else state[1]
        if order not in ("|", "<", ">", "="):
            raise UnsafeFile(f"an array's dtype has byte order {describe(order)}")
        self.byteorder = order

    def numpy(self):
        import numpy as np

        return np.dtype(self.code).newbyteorder(">" if self.byteorder == ">" else "<")


class PickledArray:
    """Stands in for a pickled numpy array: built with numpy.frombuffer once its bytes are checked to
    match its shape and dtype (.array), each array's bytes charged to the file's budget."""

    def __init__(self, budget):
        self.budget, self.array = budget, None

    def build(self, shape, dtype, fortran, raw):
        import numpy as np

        raw = raw.encode("latin1") if isinstance(raw, str) else raw
        if not (isinstance(shape, tuple) and len(shape) <= MAX_TENSOR_DIMS and all(map(layout_number, shape))
                and isinstance(dtype, _DtypeSpec) and isinstance(fortran, bool)
                and isinstance(raw, (bytes, bytearray))):
            raise UnsafeFile("an array has an invalid shape, dtype or data")
        dtype = dtype.numpy()
        if math.prod(shape) * dtype.itemsize != len(raw):
            raise UnsafeFile(f"an array of shape {list(shape)} holds {len(raw):,} bytes, not "
                             f"{math.prod(shape) * dtype.itemsize:,}")
        self.budget.take("tensor data", len(raw))
        order = "F" if fortran else "C"
        self.array = np.frombuffer(raw, dtype).reshape(shape, order=order).astype(dtype.newbyteorder("="))
        return self

    def __setstate__(self, state):  # numpy's ndarray state, after _reconstruct (pickle protocols 0-4)
        if not (isinstance(state, tuple) and len(state) == 5):
            raise UnsafeFile("an array's state is not (version, shape, dtype, order, data)")
        self.build(*state[1:])


class PickledDataset:
    """Stands in for a pickled MyDataset, the course's or a student's class of that name: its
    the_list, rebuilt as data (the class's own code never runs)."""

    the_list = None  # until its state is set; a dataset without one is refused

    def __setstate__(self, state):
        if not isinstance(state, dict) or "the_list" not in state:
            raise UnsafeFile("a MyDataset holds no the_list")
        if state.get("transform") is not None:
            raise UnsafeFile("a MyDataset holds a transform (code); save it with transform=None")
        self.the_list = state["the_list"]


# The objects whose state a pickle may set (BUILD): the stand-ins, which check it, and
# OrderedDict, whose attributes a state_dict's _metadata sets.
_BUILDABLE = (_DtypeSpec, PickledArray, PickledDataset, collections.OrderedDict)


def as_plain(value):
    """A stand-in turned into what it stands for (a PickledArray's array, a PickledDataset's list);
    UnsafeFile for one whose state the file never set."""
    if isinstance(value, PickledArray):
        if value.array is None:
            raise UnsafeFile("an array has no data (its state was never set)")
        return value.array
    if isinstance(value, PickledDataset):
        if value.the_list is None:
            raise UnsafeFile("a MyDataset has no the_list (its state was never set)")
        return value.the_list
    return value


def _numpy_globals(budget):
    """numpy's array, scalar and dtype constructors as stand-ins: what a pickle of numpy data names."""

    def reconstruct(cls, shape, code):  # numpy.core.multiarray._reconstruct(ndarray, (0,), b"b")
        return PickledArray(budget)

    def frombuffer(buffer, dtype, shape, order):  # pickle protocol 5: numpy.core.numeric._frombuffer
        return PickledArray(budget).build(shape, dtype, order == "F", buffer)

    def scalar(dtype, raw=b""):  # numpy.int64(2): numpy.core.multiarray.scalar(dtype, raw bytes)
        array = PickledArray(budget).build((), dtype, False, raw).array
        return array.item()

    return {
        **{(f"numpy{core}.multiarray", "_reconstruct"): reconstruct for core in (".core", "._core")},
        **{(f"numpy{core}.multiarray", "scalar"): scalar for core in (".core", "._core")},
        **{(f"numpy{core}.numeric", "_frombuffer"): frombuffer for core in (".core", "._core")},
        ("numpy", "ndarray"): None,
        ("numpy", "dtype"): _DtypeSpec,
        ("_codecs", "encode"): _latin1_encode(budget),
    }


def _data_pickle_globals(budget):
    """Everything a pickle.dump of the course's data needs, and nothing else, within the budget: lists of
    (image, label) whose images are tensors or numpy arrays and labels ints, numpy ints or tensors, as a
    plain list or a MyDataset (pickled by NEWOBJ, or by copyreg._reconstructor in protocols 0 and 1)."""

    def load_storage_bytes(data):
        # Stands in for torch.storage._load_from_bytes, which would unpickle with weights_only=False.
        if not isinstance(data, bytes):
            raise UnsafeFile("a storage is not stored as bytes")
        budget.take("tensor data", len(data))
        storage = read_legacy_torch(data, {}, "tensor storage")
        if not isinstance(storage, _Storage):
            raise UnsafeFile("a storage blob holds something other than one storage")
        return storage

    def reconstructor(cls, base, state):
        if cls is not PickledDataset or base is not object or state is not None:
            raise UnsafeFile("it rebuilds an object other than a MyDataset")
        return PickledDataset()

    return {
        **tensor_globals(budget),
        **_numpy_globals(budget),
        ("torch.storage", "_load_from_bytes"): load_storage_bytes,
        ("*", "MyDataset"): PickledDataset,
        **{(module, "_reconstructor"): reconstructor for module in ("copyreg", "copy_reg")},
        **{(module, "object"): object for module in ("builtins", "__builtin__")},
    }


def _unpickle(data, allowed, path, what, encoding="ASCII"):
    """The object in data through the restricted unpickler; every way a file can fail is one UserError line."""
    try:
        return RestrictedUnpickler(io.BytesIO(data), allowed, what, len(data), encoding=encoding).load()
    except UnsafeFile as e:
        raise UserError(f"{path}: refused: {e}") from None
    except RecursionError:
        raise UserError(f"{path}: refused: nested too deeply for a {what}") from None
    except Exception as e:  # a broken file can fail inside unpickling in many ways; all mean the same
        raise UserError(f"{path}: unreadable or truncated {what} ({type(e).__name__}: {one_line(e)})") from None


def read_pickle(path, what, hint=""):
    """The object in a pickle.dump() of course data, loaded without running code from it.

    Memory stays bounded by the file: decoded bytes, tensor and array data and tensor objects
    may each total at most the file's size. numpy arrays come back as PickledArray (.array),
    a pickled MyDataset as PickledDataset (.the_list). Returns (object, the file's size in bytes).
    """
    data = read_input_file(path, what, hint)
    if data[:4] == ZIP_MAGIC:
        raise UserError(f"{path}: a torch.save() zip archive, not a course {what} pickle (a pickle.dump of a list "
                        "of (image, label) tuples)")
    return _unpickle(data, _data_pickle_globals(Budget(len(data))), path, f"course {what} pickle"), len(data)


# ---------------------------------------------------------------------------
# CIFAR-10's python batches: pickled dicts of numpy arrays


def read_cifar_batch(path):
    """One of CIFAR-10's python batches (data_batch_1, ...): (pixels uint8 [N, 3072], labels [N] ints 0-9).

    The batches are pickled dicts of numpy arrays. pickle.load (as torchvision uses it) would
    let such a file call anything; here only numpy's array and dtype constructors are
    resolved, by stand-ins that accept plain arrays whose bytes match their shape.
    """
    data = read_input_file(path, "CIFAR-10 batch")
    batch = _unpickle(data, _numpy_globals(Budget(len(data))), path, "CIFAR-10 batch", encoding="bytes")
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


def _check_zip(data, path):
    """A zip checkpoint may not expand past its own size, and its checksums must hold.

    torch.save stores entries uncompressed; a compressed entry could inflate without bound
    (a zip bomb), and a CRC mismatch means bytes changed after saving (corruption that would
    otherwise load as garbage weights).
    """
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as archive:
            entries = archive.infolist()
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
            bad = archive.testzip()
    except (zipfile.BadZipFile, RuntimeError, NotImplementedError, ValueError, UnicodeError, EOFError) as e:
        raise UserError(f"{path}: not a readable PyTorch checkpoint (broken zip archive: {one_line(e)})") from None
    if bad is not None:
        raise UserError(f"{path}: corrupted: the checksum of {bad} does not match its data")


def _torch_load(data, path):
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
            raise UserError(f"{path}: refused: the file holds objects other than tensors{detail}, and loading "
                            "them could run code; only weight checkpoints are accepted") from None
        raise UserError(f"{path}: not a readable PyTorch checkpoint (broken pickle)") from None
    except Exception as e:  # torch raises many types for corrupt files
        raise UserError(f"{path}: not a readable PyTorch checkpoint ({one_line(e)})") from None


MAX_NESTING = 32  # a checkpoint nests 2 deep, a resume state 5; a file may nest millions


def plain_mappings(value, path, depth=MAX_NESTING):
    """value from a torch.save() file with each dict and OrderedDict in it a plain dict of its items.

    Loading may set an OrderedDict's attributes (a state_dict's _metadata, by torch's own loader
    any other), and one named items or get would take the place of the method for every caller.
    """
    if depth < 0:
        raise UserError(f"{path}: refused: nested more than {MAX_NESTING} levels deep; a checkpoint never is")
    if type(value) in (dict, collections.OrderedDict):
        return {k: plain_mappings(v, path, depth - 1) for k, v in dict.items(value)}
    if type(value) in (list, tuple):
        return type(value)(plain_mappings(v, path, depth - 1) for v in value)
    return value


def _load_zip(data, path):
    """The object in a torch.save() zip archive's bytes: the archive checked, then loaded weights-only,
    its mappings plain dicts."""
    _check_zip(data, path)
    return plain_mappings(_torch_load(data, path), path)


def read_torch_file(path, what):
    """The object in a torch.save() zip file, loaded weights-only within the zip checks above."""
    data = read_input_file(path, what)
    if data[:4] != ZIP_MAGIC:
        raise UserError(f"{path}: not a {what} written by torch.save")
    return _load_zip(data, path)


def read_checkpoint(path, architectures):
    """(state_dict, arch or None) from a checkpoint file, loaded without running code from it.

    Accepts the course format {'model_state_dict': state}, an 'arch'-tagged dict, or a bare
    state_dict; zip (torch >= 1.6) or legacy serialization. arch, when present, must be one
    of architectures.
    """
    data = read_input_file(path, "checkpoint")
    if data[:4] == ZIP_MAGIC:
        ckpt = _load_zip(data, path)
    else:
        try:
            # What a legacy checkpoint may name: tensors, parameters, ordered dicts.
            allowed = {**tensor_globals(Budget(len(data))), ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
                       ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter}
            ckpt = read_legacy_torch(data, allowed, "checkpoint")
        except NotTorchFormat:
            raise UserError(f"{path}: not a PyTorch checkpoint") from None
        except UnsafeFile as e:
            raise UserError(f"{path}: refused: {e}") from None
        except Exception as e:  # broken bytes fail inside unpickling in many ways
            raise UserError(f"{path}: not a readable PyTorch checkpoint ({type(e).__name__})") from None
        ckpt = plain_mappings(ckpt, path)
    if isinstance(ckpt, dict) and "model_state_dict" in ckpt:
        state, arch = ckpt["model_state_dict"], ckpt.get("arch")
    else:
        state, arch = ckpt, None
    if not isinstance(state, dict) or not state or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()
    ):
        raise UserError(f"{path}: expected {{'model_state_dict': state_dict}} or a bare state_dict of tensors")
    if arch is not None and (not isinstance(arch, str) or arch not in architectures):
        raise UserError(f"{path}: unknown architecture {describe(arch)} (known: {', '.join(architectures)})")
    return state, arch


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
            shown = ", ".join(keys[:4]) + (f" (+{len(keys) - 4} more)" if len(keys) > 4 else "")
            parts.append(f"{label}: {shown}")
    return "; ".join(parts)


def tensor_problem(value):
    """Why a tensor from a file cannot be used as plain numbers (sparse, meta, NaN or infinite), or None."""
    if value.layout != torch.strided or value.is_meta or value.is_quantized:
        return f"is not a plain dense tensor ({value.layout}, {value.device})"
    if value.is_floating_point() and not torch.isfinite(value).all():
        return "holds NaN or infinite values"
    return None


def check_state_dict(model, state, where):
    """Refuse a state_dict that does not fit model or holds non-finite or wrongly typed values."""
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
            advice = ": the checkpoint is corrupted or comes from a diverged run" if "NaN" in problem else ""
            raise UserError(f"{where}: tensor {key} {problem}{advice}")
