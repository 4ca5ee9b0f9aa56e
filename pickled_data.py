"""Course data in pickles: numpy arrays and scalars and the course's MyDataset, rebuilt as data
(never by numpy's or the pickled class's own code), and what a data pickle may name.

numpy_globals serves CIFAR-10's batches too; data_pickle_globals adds the tensors of
pickled_tensors.py. Each stand-in checks what the file gives it before anything is allocated,
within the file's restricted_pickle.Budget.
"""
import math

from cli import describe
from pickled_tensors import MAX_TENSOR_DIMS, layout_number, layout_text, read_storage_blob, tensor_globals
from restricted_pickle import UnsafeFile, checks_its_state, latin1_encode

# Plain numbers only: an object array ('O') would hold pickled Python objects.
_ARRAY_DTYPES = {"u1", "i1", "u2", "i2", "u4", "i4", "u8", "i8", "b1", "f2", "f4", "f8"}


@checks_its_state
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


@checks_its_state
class PickledArray:
    """Stands in for a pickled numpy array: built with numpy.frombuffer once its bytes are checked to
    match its shape and dtype (.array), within the file's budget."""

    def __init__(self, budget):
        self.budget, self.array = budget, None

    def build(self, shape, dtype, fortran, raw):
        import numpy as np

        raw = self.budget.decode_once(raw) if isinstance(raw, str) else raw  # Python 2's strings
        if not (isinstance(shape, tuple) and len(shape) <= MAX_TENSOR_DIMS and all(map(layout_number, shape))):
            raise UnsafeFile(f"an array has an invalid shape {layout_text(shape)}: at most {MAX_TENSOR_DIMS} "
                             "dimensions, each a whole number from 0 to 2**62")
        if not (isinstance(dtype, _DtypeSpec) and isinstance(fortran, bool) and isinstance(raw, (bytes, bytearray))):
            raise UnsafeFile(f"an array has an invalid dtype, order or data ({describe(dtype)}, {describe(fortran)}, "
                             f"{describe(raw)})")
        dtype = dtype.numpy()
        if math.prod(shape) * dtype.itemsize != len(raw):
            raise UnsafeFile(f"an array of shape {list(shape)} holds {len(raw):,} bytes, not "
                             f"{math.prod(shape) * dtype.itemsize:,}")
        self.budget.build_from(raw)
        order = "F" if fortran else "C"
        self.array = np.frombuffer(raw, dtype).reshape(shape, order=order).astype(dtype.newbyteorder("="))
        return self

    def __setstate__(self, state):  # numpy's ndarray state, after _reconstruct (pickle protocols 0-4)
        if not (isinstance(state, tuple) and len(state) == 5):
            raise UnsafeFile("an array's state is not (version, shape, dtype, order, data)")
        self.build(*state[1:])


@checks_its_state
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
        ("_codecs", "encode"): latin1_encode(budget),
    }


def data_pickle_globals(budget):
    """Everything a pickle.dump of the course's data needs, and nothing else, within the budget: lists of
    (image, label) whose images are tensors or numpy arrays and labels ints, numpy ints or tensors, as a
    plain list or a MyDataset (pickled by NEWOBJ, or by copyreg._reconstructor in protocols 0 and 1)."""

    def load_storage_bytes(data):
        # Stands in for torch.storage._load_from_bytes, which would unpickle with weights_only=False.
        if not isinstance(data, bytes):
            raise UnsafeFile("a storage is not stored as bytes")
        budget.build_from(data)
        return read_storage_blob(data, budget)

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
