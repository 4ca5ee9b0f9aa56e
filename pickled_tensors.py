"""torch's tensors and storages in pickles, read without torch's own loaders.

* Stand-ins for torch's tensor rebuilders check a tensor's layout against its storage before
  viewing it (tensor_globals, checkpoint_globals);
* read_legacy_torch reads torch's legacy (non-zip) serialization within bounds, and
  read_storage_blob the one storage a pickled tensor holds;
* check_zip_pickle unpickles a zip checkpoint's data.pkl with each storage a meta tensor, before
  torch.load(weights_only=True) reads it.

Every pickle goes through restricted_pickle.RestrictedUnpickler, counted against the Budget of
the file it is in.
"""
import collections
import io

import torch

from cli import clip, describe, whole
from restricted_pickle import ZIP_FLOOR, Budget, RestrictedUnpickler, UnsafeFile, latin1_encode


class NotTorchFormat(UnsafeFile):
    """Bytes that do not start the way torch's legacy serialization does."""


MAX_TENSOR_DIMS = 8
# No shape, stride or offset in a real file comes near this; a bigger number (a pickle may hold
# one of millions of digits) would make the bounds arithmetic itself take minutes.
MAX_LAYOUT_NUMBER = 2**62


def layout_text(value):
    """A shape, stride or offset from a file for a message: its numbers, each described (one may have
    thousands of digits), or the value described when it is no short list of them."""
    if isinstance(value, (tuple, list)) and len(value) <= MAX_TENSOR_DIMS:
        return "[" + ", ".join(map(describe, value)) + "]"
    return describe(value)


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
    ("torch", f"{name}Storage"): _StorageType(dtype) for name, dtype in (
        ("Float", torch.float32), ("Double", torch.float64), ("Half", torch.float16),
        ("BFloat16", torch.bfloat16), ("Long", torch.int64), ("Int", torch.int32), ("Short", torch.int16),
        ("Char", torch.int8), ("Byte", torch.uint8), ("Bool", torch.bool),
    )
}
_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C  # torch's legacy (non-zip) serialization
_LEGACY_PROTOCOL = 1001
# A data pickle's storage blobs that start like one already read whole skip unpickling those bytes
# (read_storage_blob): at most this many such starts per file, each at most this long.
_MAX_STORAGE_PREFIXES, _MAX_PREFIX_BYTES = 16, 1024


def _rebuild_tensor(storage, offset, size, stride, requires_grad=False, backward_hooks=None, metadata=None):
    """Stands in for torch._utils._rebuild_tensor(_v2): a view of a storage read from the file,
    after checking that every element it reaches lies inside that storage."""
    if not isinstance(storage, _Storage):
        raise UnsafeFile("a tensor is built from something that is not a storage")
    size, stride = tuple(size) if isinstance(size, (tuple, list)) else size, \
        tuple(stride) if isinstance(stride, (tuple, list)) else stride
    if not (isinstance(size, tuple) and isinstance(stride, tuple) and len(size) == len(stride) <= MAX_TENSOR_DIMS
            and all(layout_number(v) for v in (offset, *size, *stride))):
        raise UnsafeFile(f"a tensor has an invalid layout (offset {layout_text(offset)}, size {layout_text(size)}, "
                         f"stride {layout_text(stride)}): at most {MAX_TENSOR_DIMS} dimensions, each number whole, "
                         "from 0 to 2**62")
    n = storage.tensor.numel()
    if all(size):
        last = offset + sum((s - 1) * st for s, st in zip(size, stride))
        if last >= n:
            raise UnsafeFile(f"a tensor of size {list(size)} reaches element {last:,} of a storage of {n:,} elements")
    elif offset > n:
        raise UnsafeFile(f"a tensor starts at element {offset:,} of a storage of {n:,} elements")
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
    """The globals a pickled tensor needs (rebuilt within bounds), each tensor counted by budget."""

    def rebuild_tensor(*args):
        budget.take_tensor()
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


def _claim(claimed, size, what):
    """Refuse storages that claim more bytes than the file holds: their data must follow in it."""
    if claimed > size:
        raise UnsafeFile(f"its storages claim {claimed:,} bytes but the {what} holding them is only {size:,} bytes")


def _read_legacy_pickles(f, data, allowed, what, budget):
    """(object, storages by key, list of keys): the pickles of torch's legacy format, up to the
    storages' data. Each storage is allocated as declared once the declared sizes together are
    found to fit in the file (torch's own reader allocates whatever a few bytes declare)."""

    def plain_pickle():
        return RestrictedUnpickler(f, {}, budget, what=what).load()

    try:
        torch_format = plain_pickle() == _LEGACY_MAGIC and plain_pickle() == _LEGACY_PROTOCOL
    except Exception:  # anything else at the start of the file
        if budget.instructions_left < 0:  # the file's budget ran out here: say so
            raise
        torch_format = False
    if not torch_format:
        raise NotTorchFormat("not in torch's serialization format")
    info = plain_pickle()
    if not isinstance(info, dict) or info.get("little_endian") is not True:
        raise UnsafeFile("written on a big-endian machine or with unknown system info; not supported")
    storages, claimed = {}, 0

    def persistent_load(saved_id):
        nonlocal claimed
        kind, key, numel = _declared_storage(saved_id, 6)
        if key in storages:
            return _same_storage(storages[key], kind, numel, key)
        nbytes = numel * kind.dtype.itemsize
        claimed += nbytes
        _claim(claimed, len(data), what)
        budget.storage_bytes += nbytes
        storages[key] = _Storage(torch.empty(numel, dtype=kind.dtype))
        return storages[key]

    obj = RestrictedUnpickler(f, {**allowed, **_STORAGE_TYPES}, budget, persistent_load, what=what).load()
    keys = plain_pickle()
    if not isinstance(keys, list) or sorted(keys) != sorted(storages) or len(set(keys)) != len(keys):
        raise UnsafeFile("its list of storages does not match the storages it uses")
    return obj, storages, keys


def _read_legacy_data(f, storages, keys):
    """Fill each storage, in the order of keys, from its element count and raw bytes in f, which must end there."""
    for key in keys:
        tensor = storages[key].tensor
        count = int.from_bytes(f.read(8), "little", signed=True)
        if count != tensor.numel():
            raise UnsafeFile(f"storage {clip(key)} declares {tensor.numel():,} elements but its data says {count:,}")
        nbytes = count * tensor.element_size()
        raw = f.read(nbytes)
        if len(raw) != nbytes:
            raise UnsafeFile(f"storage {clip(key)} is truncated ({len(raw):,} of {nbytes:,} bytes)")
        if nbytes:
            tensor.view(-1).view(torch.uint8).copy_(torch.frombuffer(bytearray(raw), dtype=torch.uint8))
    if f.read(1):
        raise UnsafeFile("unexpected bytes after the last storage")


def read_legacy_torch(data, allowed, what, budget):
    """The object in torch's legacy (non-zip) serialization format, read within bounds.

    The layout: pickles of a magic number, a protocol version and system info; the object,
    whose storages are persistent ids (type, key, location, element count); the list of
    storage keys; then per storage an int64 element count and the raw little-endian bytes.
    torch's own reader allocates each storage at the count it declares before reading its
    data, so a few bytes can demand gigabytes; here the declared sizes together may not
    exceed the file's size, and each storage's data must match its declaration exactly.
    """
    f = io.BytesIO(data)
    obj, storages, keys = _read_legacy_pickles(f, data, allowed, what, budget)
    _read_legacy_data(f, storages, keys)
    return obj


def _known_storage_start(data, budget):
    """(end, key, dtype, numel) when data starts like a storage blob already read whole from this file:
    the same bytes up to the data but for the storage's key, digits of the same length (torch
    writes the storage's address, twice: in its declaration and in the list of keys). Else None."""
    for parts, length, dtype, numel in budget.storage_starts:
        start, middle, end = parts
        if not data.startswith(start):
            continue
        i = len(start)
        key = data[i : i + length]
        j = i + length + len(middle)
        if (key.isdigit() and key.isascii() and data.startswith(middle, i + length)
                and data.startswith(key, j) and data.startswith(end, j + length)):
            return j + length + len(end), key.decode(), dtype, numel
    return None


def read_storage_blob(data, budget):
    """The storage of a pickled tensor (torch.storage._load_from_bytes: one storage in torch's legacy
    format), read within the budget of the data pickle that holds it.

    A data pickle holds one such blob per tensor, and blobs of one type and size differ up to their
    data only in the storage's key. Such bytes, once read whole in this file, are not unpickled
    again: the restricted unpickler would read them the same way, with the other key. Only the
    data after them is read, and checked alike.
    """
    known = _known_storage_start(data, budget)
    if known is not None:
        end, key, dtype, numel = known
        _claim(numel * dtype.itemsize, len(data), "pickled storage")
        budget.storage_bytes += numel * dtype.itemsize
        storage = _Storage(torch.empty(numel, dtype=dtype))
        f = io.BytesIO(data)
        f.seek(end)
        _read_legacy_data(f, {key: storage}, [key])
        return storage
    f = io.BytesIO(data)
    obj, storages, keys = _read_legacy_pickles(f, data, {}, "pickled storage", budget)
    end = f.tell()
    _read_legacy_data(f, storages, keys)
    if not isinstance(obj, _Storage):
        raise UnsafeFile("a storage blob holds something other than one storage")
    key = keys[0].encode()
    parts = data[:end].split(key)
    if (len(storages) == 1 and len(parts) == 3 and key.isdigit() and key.isascii() and end <= _MAX_PREFIX_BYTES
            and len(budget.storage_starts) < _MAX_STORAGE_PREFIXES):
        budget.storage_starts.append((parts, len(key), obj.tensor.dtype, obj.tensor.numel()))
    return obj


def check_zip_pickle(pickled, record_size, what, size):
    """Unpickle a torch.save() zip archive's data.pkl without its tensor data, to refuse what
    torch.load(weights_only=True) would read without limit. Its unpickler allows far more than a
    checkpoint holds (sets, complex numbers, any codec in _codecs.encode, dozens of tensor kinds),
    charges nothing per instruction and hashes whatever keys a file chooses. Here each storage is
    a meta tensor (nothing allocated) whose declared size must equal its record's
    (record_size(key): bytes, or None when absent), each tensor a view inside it, and the rest
    as for any pickle here, within a Budget of the file's size (at least ZIP_FLOOR). torch.load
    then reads the same bytes. Returns the budget, as used."""
    budget = Budget(size, what, ZIP_FLOOR)
    storages = {}

    def persistent_load(saved_id):
        kind, key, numel = _declared_storage(saved_id, 5)
        if key in storages:
            return _same_storage(storages[key], kind, numel, key)
        nbytes = record_size(key)
        if nbytes != numel * kind.dtype.itemsize:
            raise UnsafeFile(f"storage {clip(key)} declares {numel:,} {kind.dtype} elements but its record holds "
                             f"{'no' if nbytes is None else f'{nbytes:,}'} bytes")
        budget.storage_bytes += nbytes
        storages[key] = _Storage(torch.empty(numel, dtype=kind.dtype, device="meta"))
        return storages[key]

    allowed = {**checkpoint_globals(budget), **_STORAGE_TYPES, ("_codecs", "encode"): latin1_encode(budget)}
    RestrictedUnpickler(io.BytesIO(pickled), allowed, budget, persistent_load).load()
    return budget


def looks_like_a_module(pickled):
    """Whether pickled bytes hold an nn.Module (a whole pickled model): every module pickles its
    _parameters and _modules. Used only to say what to do instead; the file is refused either way."""
    return b"_parameters" in pickled and b"_modules" in pickled

