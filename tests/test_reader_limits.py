"""The limits of the restricted readers, each at its edge: a file at the limit loads, one just past
it is refused with the line that names the limit. What the limits are and what everyday files use
of them: docs/untrusted_files.md (bench/untrusted_budgets.py measures it)."""
import codecs
import collections
import io
import pickle
import pickletools
import re
import struct
import zipfile

import numpy as np
import pytest
import torch

import dataset
import models
from cli import UserError
from pickled_data import data_pickle_globals
from restricted_pickle import Budget, RestrictedUnpickler


class Reduce:
    """Pickles as func(*args), args the very tuple given: pickled once, then named from the memo."""

    def __init__(self, func, args):
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args


def instructions(pickled):
    return sum(1 for _ in pickletools.genops(pickled))


def one_item(protocol=2, image=None):
    """A course data pickle of one item; a numpy image has no storage blob to unpickle."""
    image = np.full((3, 32, 32), 0.5, np.float32) if image is None else image
    return pickle.dumps([(image, 1)], protocol=protocol)


def before_the_data(data_pickle, *others):
    """data_pickle (protocol 2 or 3: no frames) run after the pickles in others, the object each
    builds then popped: what they build is counted, and the file still holds the data. Each other
    pickle adds its instructions but PROTO and STOP, and the POP."""
    return data_pickle[:2] + b"".join(other[2:-1] + b"0" for other in others) + data_pickle[2:]


def padded(pickled, count):
    """pickled with count more instructions that do nothing (PROTO again, as torch's own unpickler
    allows too), two bytes each."""
    return pickled[:2] + b"\x80\x02" * count + pickled[2:]


def junk_bytes(n):
    """A pickle that adds two instructions and n + 6 bytes before the data: n bytes read, then popped."""
    return b"\x80\x02B" + struct.pack("<I", n) + b"\0" * n + b"."


def refused(path, load=dataset.load_pickle):
    with pytest.raises(UserError) as error:
        load(path)
    return str(error.value)


def test_instructions_at_the_floor(tmp_path):
    # A file under 1 MiB may run 32,768 instructions, as many as one of 1 MiB.
    data = one_item()
    path = tmp_path / "at.pickle"
    path.write_bytes(padded(data, 32_768 - instructions(data)))
    assert len(dataset.load_pickle(path)[1]) == 1
    path.write_bytes(padded(data, 32_769 - instructions(data)))
    assert refused(path) == (f"{path}: refused: it holds more pickle instructions than a course data pickle of its "
                             "size may run (32,768: one per 32 bytes of the file, at least 32,768)")


def test_instructions_one_per_32_bytes_of_file(tmp_path):
    data, limit = one_item(), 40_000  # a file of 1,280,000 bytes may run 40,000 instructions
    path = tmp_path / "at.pickle"
    for extra, verdict in ((0, "loads"), (1, "refused")):
        count = limit + extra - instructions(data) - 2  # the junk bytes take two
        content = before_the_data(padded(data, count), junk_bytes(0))
        content = before_the_data(padded(data, count), junk_bytes(32 * limit - len(content)))
        path.write_bytes(content)
        assert len(content) == 32 * limit
        if verdict == "loads":
            assert len(dataset.load_pickle(path)[1]) == 1
        else:
            assert refused(path) == (f"{path}: refused: it holds more pickle instructions than a course data pickle "
                                     "of its size may run (40,000: one per 32 bytes of the file, at least 32,768)")


def zip_with_pickle(pickled, original):
    """The zip checkpoint at original with its data.pkl replaced, laid out as torch.save wrote it."""
    out = io.BytesIO()
    with zipfile.ZipFile(original) as source, zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as rebuilt:
        for entry in source.infolist():
            rebuilt.writestr(entry.filename, pickled if entry.filename.endswith("/data.pkl") else source.read(entry))
    return out.getvalue()


def test_zip_checkpoint_instructions(tmp_path):
    # A zip checkpoint's data.pkl may run 262,144 instructions whatever its size under 8 MiB (a resume
    # state's history takes about 115 an epoch), checked before torch.load reads it.
    original = tmp_path / "model.ckpt"
    torch.manual_seed(0)
    model = models.SimpleModel()
    model.save(original)
    with zipfile.ZipFile(original) as archive:
        pickled = archive.read(next(n for n in archive.namelist() if n.endswith("/data.pkl")))
    path = tmp_path / "padded.ckpt"
    path.write_bytes(zip_with_pickle(padded(pickled, 262_144 - instructions(pickled)), original))
    assert torch.equal(models.load_model(path).fc3.weight, model.fc3.weight)
    path.write_bytes(zip_with_pickle(padded(pickled, 262_145 - instructions(pickled)), original))
    assert refused(path, models.load_model) == (
        f"{path}: refused: it holds more pickle instructions than a checkpoint of its size may run (262,144: one per "
        "32 bytes of the file, at least 262,144)")


def storage_blob(numel, dtype=torch.uint8):
    """A storage as a pickled tensor holds it (torch's legacy format), its key (the storage's address,
    in its declaration and in the list of keys) made 7s."""
    out = io.BytesIO()
    torch.save(torch.zeros(numel, dtype=dtype)._typed_storage(), out, _use_new_zipfile_serialization=False)
    blob = out.getvalue()
    key = re.search(rb"X.{4}(\d+)q\x02X\x03\x00\x00\x00cpu", blob, re.DOTALL)[1]
    assert blob.count(key) == 2
    return blob.replace(key, b"7" * len(key))


def tensors_from(blob, count):
    """count tensors, each a view of the one storage in blob: a few bytes of pickle apiece."""
    args = (Reduce(torch.storage._load_from_bytes, (blob,)), 0, (1,), (1,), False, collections.OrderedDict())
    return pickle.dumps([Reduce(torch._utils._rebuild_tensor_v2, args) for _ in range(count)], protocol=2)


def test_tensor_objects(tmp_path):
    # A file under 1 MiB may build 4,096 tensors (one per 256 bytes of a 1 MiB file); the data holds one.
    data, blob, path = one_item(image=torch.full((3, 32, 32), 0.5)), storage_blob(1), tmp_path / "tensors.pickle"
    path.write_bytes(before_the_data(data, tensors_from(blob, 4_095)))
    assert len(dataset.load_pickle(path)[1]) == 1
    path.write_bytes(before_the_data(data, tensors_from(blob, 4_096)))
    assert refused(path) == (f"{path}: refused: it builds more tensors than a course data pickle of its size may "
                             "(4,096: one per 256 bytes of the file, at least 4,096)")


def test_tensor_data_built_again_from_the_same_stored_bytes(tmp_path):
    # Building a storage from the same stored bytes again costs their length, at most the file's size
    # in all: here k loads of one blob, the file padded so that its size is what the k - 1 again cost.
    data, blob, path = one_item(protocol=3, image=torch.full((3, 32, 32), 0.5)), storage_blob(2_000), tmp_path / "a"
    again = lambda k: pickle.dumps([Reduce(torch.storage._load_from_bytes, args) for _ in range(k)], protocol=3)
    args = (blob,)
    k = 2 + (len(data) + len(again(10))) // len(blob)
    bare = len(before_the_data(data, again(k), junk_bytes(0)))
    for cut, verdict in ((0, "loads"), (1, "refused")):
        content = before_the_data(data, again(k), junk_bytes((k - 1) * len(blob) - bare - cut))
        path.write_bytes(content)
        assert len(content) == (k - 1) * len(blob) - cut
        if verdict == "loads":
            assert len(dataset.load_pickle(path)[1]) == 1
        else:
            assert refused(path) == (
                f"{path}: refused: it builds tensor or array data from the same stored bytes again, more than its own "
                f"size ({len(content):,} bytes) in all; a course data pickle stores each tensor's bytes once")


def test_a_text_is_decoded_once():
    # Protocols 0-2 write bytes as _codecs.encode(text, 'latin1'): the same text decoded 1,000 times
    # gives one bytes object, not 64 MB of them.
    text = "\xe9" * 2**16
    args = (text, "latin1")
    pickled = pickle.dumps([Reduce(codecs.encode, args) for _ in range(1000)], protocol=2)
    budget = Budget(len(pickled), "course data pickle")
    decoded = RestrictedUnpickler(io.BytesIO(pickled), data_pickle_globals(budget), budget).load()
    assert decoded[0] == text.encode("latin1") and all(d is decoded[0] for d in decoded)
    assert budget.decoded_bytes == 2**16


def test_memo_slot_numbers(tmp_path):
    # Protocol 0 names a memo slot in decimal: slots below 2^31 (a dict key that hashes as itself).
    data, path = one_item(protocol=0), tmp_path / "memo.pickle"
    path.write_bytes(b"Np2147483647\n0" + data)
    assert len(dataset.load_pickle(path)[1]) == 1
    path.write_bytes(b"Np2147483648\n0" + data)
    assert refused(path) == f"{path}: refused: it stores an object in memo slot 2147483648"


def test_storages_claim_no_more_bytes_than_their_blob_holds(tmp_path):
    # A storage is allocated as declared only when the declared bytes fit in its blob: at equality the
    # claim passes (and the blob, too short for its data, is refused as truncated); one byte more is
    # refused before anything is allocated.
    numel = 4096
    full = storage_blob(numel)
    start = len(full) - numel - 8  # header, declaration and list of keys
    key = re.search(rb"7{6,}", full)[0].decode()
    path = tmp_path / "claim.pickle"
    for length, expected in ((numel, f"storage {key} is truncated ({numel - start - 8:,} of {numel:,} bytes)"),
                             (numel - 1, f"its storages claim {numel:,} bytes but the pickled storage holding them "
                                         f"is only {numel - 1:,} bytes")):
        blob = full[:length]
        tensor = Reduce(torch._utils._rebuild_tensor_v2, (Reduce(torch.storage._load_from_bytes, (blob,)), 0, (1,),
                                                          (1,), False, collections.OrderedDict()))
        path.write_bytes(pickle.dumps([(tensor, 0)], protocol=3))
        assert refused(path) == f"{path}: refused: {expected}"


def test_storage_blobs_that_start_alike_are_each_read_as_declared(tmp_path):
    # Blobs read whole once are not unpickled again up to their data when they start the same but for
    # the storage's key; a blob of another type or size is read whole. A view pickles its whole
    # storage: here images of 3,072 elements and of 6,144 (half of a pair), float32 and float64.
    pair = torch.rand(2, 3, 32, 32) * 2 - 1
    images = [torch.rand(3, 32, 32) * 2 - 1, pair[1], pair[0].double(), torch.rand(3, 32, 32) * 2 - 1, pair[0]]
    path = tmp_path / "mixed.pickle"
    path.write_bytes(pickle.dumps([(image, i % 3) for i, image in enumerate(images)], protocol=4))
    loaded, labels = dataset.load_pickle(path)
    assert all(torch.equal(a, b.float()) for a, b in zip(loaded, images)) and labels.tolist() == [0, 1, 2, 0, 1]


@pytest.mark.parametrize("other_key, expected", [
    (b"8", "refused: its list of storages does not match the storages it uses"),
    (b"\xff", "not a course data pickle (a pickle.dump of a list of (image, label) tuples), or a damaged one "
             "(UnicodeDecodeError: 'utf-8' codec can't decode byte 0xff in position 0: invalid start byte)"),
])
def test_a_blob_that_starts_alike_but_names_another_key_is_read_whole(tmp_path, other_key, expected):
    # The second image's blob is the first's but for its list of keys: naming a key the declaration does
    # not, or bytes that are no text at all. Read whole, it is refused, as it would be first in a file.
    blob = storage_blob(3072, torch.float32)
    key = re.search(rb"7{6,}", blob)[0]
    first, second = blob.index(key), blob.rindex(key)
    odd = blob[:second] + other_key * len(key) + blob[second + len(key):]
    assert first < second and odd.count(key) == 1

    def image(data):
        storage = Reduce(torch.storage._load_from_bytes, (data,))
        return Reduce(torch._utils._rebuild_tensor_v2, (storage, 0, (3, 32, 32), (1024, 32, 1), False,
                                                        collections.OrderedDict()))

    path = tmp_path / "odd.pickle"
    path.write_bytes(pickle.dumps([(image(blob), 0), (image(odd), 1)], protocol=3))
    assert refused(path) == f"{path}: {expected}"


def test_a_key_prefixed_a_hundred_thousand_times_is_one_short_line(tmp_path):
    # Wrappers' prefixes are stripped at most 4 times (each strip copies every key): a 700 KB key of
    # 'module.' repeated is refused as another network's, in a line that shows it cut.
    path = tmp_path / "deep.ckpt"
    torch.save({"module." * 100_000 + "x": torch.zeros(1)}, path)
    message = refused(path, models.load_model)
    assert message == (f"{path}: not a SimpleModel checkpoint: missing keys: conv1.weight, conv1.bias, conv2.weight, "
                       "conv2.bias (+6 more); unexpected keys: module.module.module.module.module.modul... (699,973 "
                       "characters)")
    assert len(message) < 300
