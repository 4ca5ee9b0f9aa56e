"""The restricted unpickler: what a pickle from anyone may build, and at what cost.

A pickle is a program; pickle.load runs whatever it names. This module unpickles course data,
CIFAR-10 batches and legacy torch checkpoints without running code from them:

* RestrictedUnpickler resolves only allowlisted globals and charges every instruction to the
  file's size, with a Budget for the bytes it may make the loader materialize;
* stand-ins take the place of what a pickle names (torch's tensor rebuilders, numpy's array,
  scalar and dtype constructors, the course's MyDataset) and check what they are given
  before anything is allocated;
* read_legacy_torch reads torch's legacy (non-zip) serialization within bounds.

Which globals each kind of file may name, and the files themselves, are untrusted.py's.
"""
import codecs
import collections
import io
import math
import pickle
import struct

import torch

from cli import clip, describe, whole

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
      it for every later load;
    * items are set only on dicts, with keys that are strings, bytes or ints below 2^31 (and
      memo slots likewise), and there are no sets: Python hashes other ints, floats and
      tuples the same way in every process, so a file could choose 100,000 keys of one hash
      and make each insertion walk all the others (minutes of CPU from a megabyte).

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
        risk = "" if module.split(".")[0] == "torch" else " (loading it could run code)"
        raise UnsafeFile(f"it refers to {clip(module)}.{clip(name)}, which a {self.what} never holds{risk}")

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

    def _check_keys(self, keys):
        for key in keys:
            if not safe_key(key):
                raise UnsafeFile(f"a dict has the key {describe(key)}; a {self.what} uses names and small numbers")

    def _dict_to_fill(self):
        target = self.stack[-1]
        if type(target) not in (dict, collections.OrderedDict):
            raise UnsafeFile(f"it sets items of {describe(target)}, which a {self.what} never does")
        return target

    def load_setitem(self):
        key, value = self.stack[-2:]
        del self.stack[-2:]
        self._check_keys([key])
        self._dict_to_fill()[key] = value

    def load_setitems(self):
        items = self.pop_mark()
        target = self._dict_to_fill()
        self._check_keys(items[::2])
        for key, value in zip(items[::2], items[1::2], strict=True):
            target[key] = value

    def load_dict(self):
        items = self.pop_mark()
        self._check_keys(items[::2])
        self.append(dict(zip(items[::2], items[1::2], strict=True)))

    def load_put(self):  # protocol 0's memo slot is a decimal number of any size
        slot = int(self.readline()[:-1])
        if not 0 <= slot < 2**31:
            raise UnsafeFile(f"it stores an object in memo slot {describe(slot)}")
        self.memo[slot] = self.stack[-1]

    def load_set(self):
        raise UnsafeFile(f"it builds a set, which a {self.what} never holds")

    dispatch[pickle.SETITEM[0]] = load_setitem
    dispatch[pickle.SETITEMS[0]] = load_setitems
    dispatch[pickle.DICT[0]] = load_dict
    dispatch[pickle.PUT[0]] = load_put
    dispatch[pickle.EMPTY_SET[0]] = dispatch[pickle.ADDITEMS[0]] = dispatch[pickle.FROZENSET[0]] = load_set

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


def safe_key(key):
    """A dict key whose hash a file cannot choose: a string or bytes (hashed with a per-process
    secret) or a small int (its own hash, each different)."""
    return type(key) in (str, bytes) or (type(key) is int and -2**31 <= key < 2**31)


class Budget:
    """Bytes a file may make the loader materialize, per kind: no more than the file holds."""

    def __init__(self, limit):
        self.limit, self.used = limit, collections.Counter()

    def take(self, kind, nbytes):
        self.used[kind] += nbytes
        if self.used[kind] > self.limit:
            raise UnsafeFile(f"it would expand to more than its own size ({self.limit:,} bytes) of {kind}; "
                             "a course data pickle never does")


# ---------------------------------------------------------------------------
# Tensors: torch's rebuilders as stand-ins, and its legacy (non-zip) serialization


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


def _empty_ordered_dict(*args, **kwargs):
    """Stands in for collections.OrderedDict: empty, as torch.save makes one (its items follow by
    SETITEMS, whose keys are checked); given items it would hash whatever keys a file chose."""
    if args or kwargs:
        raise UnsafeFile("it builds an OrderedDict from a list of items, which torch.save never does")
    return collections.OrderedDict()


def tensor_globals(budget):
    """The globals a pickled tensor needs (rebuilt within bounds), each tensor charged to budget."""

    def rebuild_tensor(*args):
        budget.take("tensor objects", TENSOR_OBJECT_COST)
        return _rebuild_tensor(*args)

    return {
        ("torch._utils", "_rebuild_tensor_v2"): rebuild_tensor,
        ("torch._utils", "_rebuild_tensor"): rebuild_tensor,
        ("collections", "OrderedDict"): _empty_ordered_dict,
    }


def checkpoint_globals(budget):
    """What a legacy checkpoint may name: tensors, parameters (a dict saved from named_parameters()),
    ordered dicts."""
    return {**tensor_globals(budget), ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
            ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter}


def _declared_storage(saved_id, length):
    """(storage type, key, element count) of a storage's persistent id: ('storage', type, key,
    location, count), plus a view in the legacy format. The location is ignored: data always
    lands on the CPU."""
    if not (isinstance(saved_id, tuple) and len(saved_id) == length and saved_id[0] == "storage"):
        raise UnsafeFile(f"unknown persistent object {describe(saved_id)}")
    kind, key, numel = saved_id[1], saved_id[2], saved_id[4]
    if not isinstance(kind, _StorageType) or not isinstance(key, str) or not layout_number(numel):
        raise UnsafeFile("a storage has an invalid declaration")
    if length == 6 and saved_id[5] is not None:
        raise UnsafeFile("storage views are not supported")
    return kind, key, numel


def _same_storage(storage, kind, numel, key):
    """A storage declared again (tensors sharing it): only as it was declared first."""
    if storage.tensor.dtype != kind.dtype or storage.tensor.numel() != numel:
        raise UnsafeFile(f"storage {clip(key)} is declared twice, differently")
    return storage


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
        kind, key, numel = _declared_storage(saved_id, 6)
        if key in storages:
            return _same_storage(storages[key], kind, numel, key)
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


# A resume state's pickle grows with its history (about 115 instructions an epoch): its budget
# of instructions is at least this many bytes' worth, enough for about 2,000 epochs.
ZIP_PICKLE_FLOOR = 2**26


def check_zip_pickle(pickled, record_size, what, size):
    """Unpickle a torch.save() zip archive's data.pkl without its tensor data, to refuse what
    torch.load(weights_only=True) would read without limit. Its unpickler allows far more than a
    checkpoint holds (sets, complex numbers, any codec in _codecs.encode, dozens of tensor kinds),
    charges nothing per instruction and hashes whatever keys a file chooses. Here each storage is
    a meta tensor (nothing allocated) whose declared size must equal its record's
    (record_size(key): bytes, or None when absent), each tensor a view inside it, and the rest
    as for any pickle here. torch.load then reads the same bytes."""
    budget = Budget(size)
    storages = {}

    def persistent_load(saved_id):
        kind, key, numel = _declared_storage(saved_id, 5)
        if key in storages:
            return _same_storage(storages[key], kind, numel, key)
        nbytes = record_size(key)
        if nbytes != numel * kind.dtype.itemsize:
            raise UnsafeFile(f"storage {clip(key)} declares {numel:,} {kind.dtype} elements but its record holds "
                             f"{'no' if nbytes is None else f'{nbytes:,}'} bytes")
        storages[key] = _Storage(torch.empty(numel, dtype=kind.dtype, device="meta"))
        return storages[key]

    allowed = {**checkpoint_globals(budget), **{("torch", n): t for n, t in _STORAGE_TYPES.items()},
               ("_codecs", "encode"): _latin1_encode(budget)}
    RestrictedUnpickler(io.BytesIO(pickled), allowed, what, max(size, ZIP_PICKLE_FLOOR), persistent_load).load()


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


def numpy_globals(budget):
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


def data_pickle_globals(budget):
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
        **numpy_globals(budget),
        ("torch.storage", "_load_from_bytes"): load_storage_bytes,
        ("*", "MyDataset"): PickledDataset,
        **{(module, "_reconstructor"): reconstructor for module in ("copyreg", "copy_reg")},
        **{(module, "object"): object for module in ("builtins", "__builtin__")},
    }
