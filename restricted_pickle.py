"""The restricted unpickler: what a pickle from anyone may build, and at what cost.

A pickle is a program; pickle.load runs whatever it names. This module unpickles without running
code from the file:

* RestrictedUnpickler resolves only the globals it is given and sets an object's state only on
  OrderedDict and on stand-ins that check it (checks_its_state);
* Budget bounds, by the file's size, what the file may make the loader do: the instructions it
  runs, the tensor objects it builds and the stored bytes it makes the loader build data from
  twice (docs/untrusted_files.md has the numbers behind each limit);
* latin1_encode stands in for _codecs.encode, which pickle protocols 0-2 use to write bytes.

The stand-ins themselves live beside what they stand for: pickled_tensors.py (torch's tensors,
storages and legacy format) and pickled_data.py (numpy arrays, the course's MyDataset).
"""
import codecs
import collections
import pickle
import struct

from cli import clip, describe

# What a file of S bytes may make the loader do; docs/untrusted_files.md measures each against the
# everyday files. An instruction costs CPU and builds at most one small object beside data it reads
# from the file: one per INSTRUCTION_BYTES of file keeps those objects within a few times S.
INSTRUCTION_BYTES = 32
TENSOR_OBJECT_BYTES = 256  # a tensor object takes about 600 bytes of memory
DATA_FLOOR = 2**20  # a smaller file counts as this size (32,768 instructions, 4,096 tensors)
# A zip checkpoint's data.pkl counts as at least this size: a resume state's history grows by about
# 115 instructions an epoch, and 262,144 instructions hold some 2,000 epochs.
ZIP_FLOOR = 2**23


class UnsafeFile(Exception):
    """A file that names something it may not (code, an unknown type) or claims more than it holds."""


class MalformedPickle(pickle.UnpicklingError):
    """Bytes that are no pickle at all where an instruction should be: no instruction of that code, a
    global whose name is no Python name (text read as a pickle: 'car,truck' after the GLOBAL code c)."""


def python_name(text):
    """Whether text is a dotted Python name, as a pickled global's module and name are."""
    return bool(text) and all(part.isidentifier() for part in text.split("."))


class UnknownGlobal(UnsafeFile):
    """A file that names a global outside its allowlist: module.name (a class, a function)."""

    def __init__(self, message, module, name):
        super().__init__(message)
        self.module, self.name = module, name


class Budget:
    """What one file may make the loader do, each bounded by the file's size: the pickle instructions
    it runs and the tensor objects it builds, counted over every pickle inside the file (a data
    pickle's storage blobs too), and the bytes of tensor or array data built a second time from
    stored bytes already used once. Building data from stored bytes the first time is bounded by the
    file itself, and a text is decoded once: given again, it gives the same bytes."""

    def __init__(self, size, what, floor=DATA_FLOOR):
        counted = max(size, floor)
        self.size, self.what, self.floor = size, what, floor
        self.instruction_limit = self.instructions_left = counted // INSTRUCTION_BYTES
        self.tensor_limit = self.tensors_left = counted // TENSOR_OBJECT_BYTES
        self.data_again = 0  # bytes of tensor or array data built from stored bytes used before
        self.decoded_bytes = 0
        self.storage_bytes = 0  # bytes of the storages the file declares (pickled_tensors.py)
        self._built_from = {}  # id -> stored bytes data was built from (kept, so that ids stay unique)
        self._decoded = {}  # id(text) -> (text, its bytes)
        self.storage_starts = []  # pickled_tensors.read_storage_blob: how storage blobs read whole start

    def instructions_used(self):
        return self.instruction_limit - self.instructions_left

    def tensors_used(self):
        return self.tensor_limit - self.tensors_left

    def out_of_instructions(self):
        return UnsafeFile(f"it holds more pickle instructions than a {self.what} of its size may run "
                          f"({self.instruction_limit:,}: one per {INSTRUCTION_BYTES} bytes of the file, at least "
                          f"{self.floor // INSTRUCTION_BYTES:,})")

    def take_tensor(self):
        self.tensors_left -= 1
        if self.tensors_left < 0:
            raise UnsafeFile(f"it builds more tensors than a {self.what} of its size may ({self.tensor_limit:,}: one "
                             f"per {TENSOR_OBJECT_BYTES} bytes of the file, at least "
                             f"{self.floor // TENSOR_OBJECT_BYTES:,})")

    def build_from(self, stored):
        """Note that tensor or array data is about to be built from stored (bytes, a bytearray or a text
        from the file). The first time costs nothing more: the file holds those bytes. Each further
        time costs their length, at most the file's size in all: pickle.dump writes each tensor's and
        array's bytes once, so only a crafted file builds from the same bytes twice."""
        if id(stored) not in self._built_from:
            self._built_from[id(stored)] = stored
            return
        self.data_again += len(stored)
        if self.data_again > self.size:
            raise UnsafeFile(f"it builds tensor or array data from the same stored bytes again, more than its own size "
                             f"({self.size:,} bytes) in all; a {self.what} stores each tensor's bytes once")

    def decode_once(self, text):
        """text encoded as latin-1: each text once, so that decoded bytes never exceed the file's texts."""
        known = self._decoded.get(id(text))
        if known is None:
            known = self._decoded[id(text)] = (text, codecs.encode(text, "latin1"))
            self.decoded_bytes += len(text)
        return known[1]


def latin1_encode(budget):
    """Stands in for _codecs.encode: pickle protocols 0-2 write bytes as encode(str, 'latin1'); other
    codecs ('hex', 'base64', nested) would let a few bytes expand without bound."""

    def encode(text, encoding="latin1"):
        if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
            raise UnsafeFile(f"it encodes {type(text).__name__} data with codec {describe(encoding)}")
        return budget.decode_once(text)

    return encode


# The objects whose state a pickle may set (BUILD): OrderedDict, whose attributes a state_dict's
# _metadata sets, and the stand-ins marked with checks_its_state.
_BUILDABLE = {collections.OrderedDict}


def checks_its_state(cls):
    """Class decorator: a stand-in whose __setstate__ checks what a file gives it, so BUILD may set it."""
    _BUILDABLE.add(cls)
    return cls


def safe_key(key):
    """A dict key whose hash a file cannot choose: a string or bytes (hashed with a per-process
    secret) or a small int (its own hash, each different)."""
    return type(key) in (str, bytes) or (type(key) is int and -2**31 <= key < 2**31)


class RestrictedUnpickler(pickle._Unpickler):
    """Python's own (pure-Python) unpickler, with these limits:

    * find_class resolves only allowlisted globals;
    * every instruction counts against the file's Budget, so the CPU it takes and the Python
      objects it builds (each instruction at most one small object beside the data it reads)
      stay within what the file's size allows: a file of a million one-byte instructions is
      refused instead of taking hundreds of megabytes;
    * BUILD (set an object's state) works only on OrderedDict and the stand-ins that check it:
      on a tensor it would resize its storage, on a shared object it would change it for every
      later load;
    * items are set only on dicts, with keys that are strings, bytes or ints below 2^31 (and
      memo slots likewise), and there are no sets: Python hashes other ints, floats and
      tuples the same way in every process, so a file could choose 100,000 keys of one hash
      and make each insertion walk all the others (minutes of CPU from a megabyte).

    The pure-Python unpickler keeps its memo in a dict and reads what a BINBYTES opcode
    declares only as far as the data goes; the C one grows its memo to any index a file names
    and reserves any declared length first. encoding="bytes" reads Python 2's strings as bytes
    (CIFAR-10's batches were written by Python 2). what names the pickle in messages (the
    budget's file by default).
    """

    dispatch = dict(pickle._Unpickler.dispatch)

    def __init__(self, file, allowed, budget, persistent_load=None, encoding="ASCII", what=None):
        super().__init__(file, encoding=encoding)
        self.allowed, self.budget, self.what = allowed, budget, what or budget.what
        if persistent_load is not None:
            self.persistent_load = persistent_load

    def find_class(self, module, name):
        # ("*", name) allows a class of that name from any module: a course MyDataset may have been
        # defined in the student's own script (__main__) as well as in dataset.py.
        if not (python_name(module) and python_name(name)):
            raise MalformedPickle(f"it names the global {describe(module)} {describe(name)}, which is no Python name")
        for key in ((module, name), ("*", name)):
            if key in self.allowed:
                return self.allowed[key]
        risk = "" if module.split(".")[0] == "torch" else " (loading it could run code)"
        raise UnknownGlobal(f"it refers to {clip(module)}.{clip(name)}, which a {self.what} never holds{risk}",
                            module, name)

    def load_build(self):
        target, state = self.stack[-2], self.stack[-1]
        if type(target) not in _BUILDABLE:
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
            raise UnsafeFile(f"a byte array declares {n:,} bytes but the {self.what} has only {len(data):,} left")
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
        """pickle._Unpickler.load, counting each instruction against the file's budget."""
        self._unframer = pickle._Unframer(self._file_read, self._file_readline)
        self.read, self.readinto, self.readline = self._unframer.read, self._unframer.readinto, self._unframer.readline
        self.metastack, self.stack, self.proto = [], [], 0
        self.append = self.stack.append
        read, dispatch, budget = self.read, self.dispatch, self.budget
        try:
            while True:
                key = read(1)
                if not key:
                    raise EOFError
                budget.instructions_left -= 1
                if budget.instructions_left < 0:
                    raise budget.out_of_instructions()
                instruction = dispatch.get(key[0])
                if instruction is None:
                    raise MalformedPickle(f"byte {key!r} is no pickle instruction")
                instruction(self)
        except pickle._Stop as stop:
            return stop.value
