"""What everyday files use of the restricted readers' limits, and how long the training set takes to load.

    python bench/untrusted_budgets.py                     # the table (builds data/ first if needed)
    python bench/untrusted_budgets.py --baseline 9504f54  # also: data/train.pickle loaded by that commit's
                                                          # code and by this tree, in turn
    python bench/untrusted_budgets.py --baseline 9504f54 --timing-only

Writes the training set (6,400 images) in every everyday way of tests/everyday_data.py, at full size
and at twice that (the set and its mirror images), into a temporary folder, and reads each as
tester.py and trainer.py do, within a Budget of its size. Checkpoints: the layouts of common
training code (optimizer and scheduler states beside the weights, a wrapper's prefix), zip and
legacy, and a resume state after the default run's 60 epochs and after twice that. Prints what
each file used of every limit, then per limit the largest use and its headroom (limit / use; the
target is 4 or more), what the decoded texts and declared storages take of the file (bounded by
it: each text is decoded once, each storage's bytes must be in the file), and the most Python
memory one instruction builds. The limits and why: docs/untrusted_files.md.
"""
import argparse
import copy
import io
import pickle
import statistics
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

import dataset  # noqa: E402
import restricted_pickle  # noqa: E402
from cli import run_main  # noqa: E402
from everyday_data import WRITERS  # noqa: E402
from models import SimpleModel  # noqa: E402
from pickled_data import data_pickle_globals  # noqa: E402
from pickled_tensors import check_zip_pickle, checkpoint_globals, read_legacy_torch  # noqa: E402
from restricted_pickle import Budget, RestrictedUnpickler  # noqa: E402

LIMITS = ["instructions", "memo slots", "tensor objects", "data built again"]
BOUNDED_BY_THE_FILE = ["decoded bytes", "storage bytes"]


def count_memo_slots():
    """Wrap RestrictedUnpickler.load to add up the memo slots every unpickler of a file filled."""
    load, filled = RestrictedUnpickler.load, []

    def counting(self):
        try:
            return load(self)
        finally:
            filled.append(len(self.memo))

    RestrictedUnpickler.load = counting
    return filled


def usage(budget, memo, size):
    """{limit: (used, limit)} of one file."""
    return {
        "instructions": (budget.instructions_used(), budget.instruction_limit),
        # Every slot is filled by an instruction, and numbered below 2^31.
        "memo slots": (memo, budget.instruction_limit),
        "tensor objects": (budget.tensors_used(), budget.tensor_limit),
        "data built again": (budget.data_again, budget.size),
        # Each text is decoded once, so these two are bounded by the file itself: the limit shown is
        # the size the data must be in; a valid file cannot exceed it.
        "decoded bytes": (budget.decoded_bytes, size),
        "storage bytes": (budget.storage_bytes, size),
    }


def data_usage(path, memo):
    data = path.read_bytes()
    budget = Budget(len(data), "course data pickle")
    memo.clear()
    items = RestrictedUnpickler(io.BytesIO(data), data_pickle_globals(budget), budget).load()
    images, _ = dataset._check_items(items, path, len(data))  # what load_pickle does next
    return usage(budget, sum(memo), len(data)), len(images)


def checkpoint_usage(path, memo):
    data = path.read_bytes()
    memo.clear()
    if data[:4] == b"PK\x03\x04":
        with zipfile.ZipFile(path) as archive:
            names = {e.filename: e.file_size for e in archive.infolist()}
            pickled_name = next(n for n in names if n.endswith("/data.pkl"))
            folder = pickled_name[: -len("data.pkl")]
            budget = check_zip_pickle(archive.read(pickled_name), lambda key: names.get(f"{folder}data/{key}"),
                                      "checkpoint", len(data))
    else:
        budget = Budget(len(data), "checkpoint")
        read_legacy_torch(data, checkpoint_globals(budget), "checkpoint", budget)
    return usage(budget, sum(memo), len(data))


def checkpoints(folder, train_size):
    """{name: path} of the checkpoints people save, zip and legacy, and resume states."""
    torch.manual_seed(0)
    model = SimpleModel()
    adam, sgd = torch.optim.Adam(model.parameters()), torch.optim.SGD(model.parameters(), 0.1, momentum=0.9)
    schedule = torch.optim.lr_scheduler.OneCycleLR(adam, 1e-3, total_steps=10)
    for optimizer in (adam, sgd):
        model(torch.rand(2, 3, 32, 32)).sum().backward()
        optimizer.step()
    schedule.step()
    state = model.state_dict()
    wrapped = torch.nn.DataParallel(model).state_dict()
    layouts = {
        "course checkpoint": {"model_state_dict": state},
        "tutorial: weights, Adam, epoch, loss": {"epoch": 5, "model_state_dict": state,
                                                 "optimizer_state_dict": adam.state_dict(), "loss": 0.25},
        "'state_dict' of DataParallel, SGD, schedule": {"epoch": 5, "state_dict": wrapped, "optimizer": sgd.state_dict(),
                                                        "scheduler": schedule.state_dict()},
        "'model', SGD (torchvision references)": {"model": state, "optimizer": sgd.state_dict(), "epoch": 7},
    }
    paths = {}
    for name, obj in layouts.items():
        for legacy in (False, True):
            paths[f"{name}, {'legacy' if legacy else 'zip'}"] = path = folder / f"{len(paths)}.ckpt"
            torch.save(obj, path, _use_new_zipfile_serialization=not legacy)
    for epochs in (60, 120):
        paths[f"resume state after {epochs} epochs"] = path = folder / f"resume{epochs}.pt"
        torch.save(resume_state(model, adam, schedule, epochs, train_size), path)
    return paths


def resume_state(model, optimizer, schedule, epochs, train_size):
    """What trainer.py's resume state holds after epochs epochs of the default run on train_size images."""
    from metrics import compute_metrics
    from resume_state import RUN_KEYS

    scores = compute_metrics([0, 1, 2, 0], [0, 1, 2, 1])
    history = [copy.deepcopy({"epoch": e + 1, "loss": 0.5, "lr": 1e-3, "dev": scores, "val": None})
               for e in range(epochs)]
    return {"epoch": epochs, "config": {key: 0.001 for key in RUN_KEYS}, "data_sha256": "0" * 64,
            "labels": torch.zeros(train_size, dtype=torch.int64), "keep": torch.ones(train_size, dtype=torch.bool),
            "model": model.state_dict(), "average": None, "optimizer": optimizer.state_dict(),
            "scheduler": schedule.state_dict(), "history": history, "best": None}


def print_rows(rows):
    columns = LIMITS + [f"{name} / S" for name in BOUNDED_BY_THE_FILE]
    print(f"{'file':<58} {'MB':>6} " + " ".join(f"{name:>16}" for name in columns))
    for name, size, used in rows:
        cells = (f"{used[k][0] / used[k][1]:>16.1%}" for k in LIMITS + BOUNDED_BY_THE_FILE)
        print(f"{name:<58} {size / 1e6:>6.1f} " + " ".join(cells))


def print_summary(rows):
    print(f"\n{'limit':<18} {'largest everyday use':>22} {'headroom':>9}  file")
    for limit in LIMITS:
        name, size, used = max(rows, key=lambda row: row[2][limit][0] / row[2][limit][1])
        share = used[limit][0] / used[limit][1]
        headroom = f"{1 / share:.1f}x" if share else "none used"
        print(f"{limit:<18} {share:>21.1%} {headroom:>9}  {name} ({used[limit][0]:,} of {used[limit][1]:,})")
    for bound in BOUNDED_BY_THE_FILE:
        name, size, used = max(rows, key=lambda row: row[2][bound][0] / row[2][bound][1])
        print(f"{bound:<18} {used[bound][0] / used[bound][1]:>21.1%} of S (bounded by the file)  {name}")


# Instructions that build the most memory each (tracemalloc: Python objects, the memo and the stack).
SEQUENCES = {"empty dicts, memoized": (b"}\x94", 2), "empty dicts": (b"}", 1), "empty lists": (b"]", 1),
             "marks": (b"(", 1), "ints": (b"J\x00\x00\x00\x01", 1), "Nones, memoized": (b"N\x94", 2),
             "1-tuples": (b"N\x85", 2), "dict items": (b"}K\x01K\x02s", 4)}


def bytes_per_instruction(repeats=200_000):
    """{sequence: the most bytes of Python memory per instruction while unpickling it repeated}."""
    import tracemalloc

    out = {}
    for name, (chunk, count) in SEQUENCES.items():
        data = b"\x80\x04" + chunk * repeats + b"N."
        budget = Budget(len(data), "course data pickle")
        budget.instructions_left = 10 * repeats * count  # measured, not refused
        tracemalloc.start()
        before = tracemalloc.get_traced_memory()[0]
        RestrictedUnpickler(io.BytesIO(data), data_pickle_globals(budget), budget).load()
        out[name] = (tracemalloc.get_traced_memory()[1] - before) / (repeats * count)
        tracemalloc.stop()
    return out


LOAD = "import sys, time; sys.path.insert(0, sys.argv[1]); from dataset import load_pickle; " \
       "start = time.perf_counter(); load_pickle(sys.argv[2]); print(time.perf_counter() - start)"


def paired_load_times(baseline, path, rounds):
    """Seconds to load path with the code at baseline and with this tree, one process each, in turn
    (ABBA order, so that a drift in the machine's load falls on both alike)."""
    from same_behaviour import export

    with tempfile.TemporaryDirectory() as old:
        export(baseline, Path(old))
        times = {baseline: [], "this tree": []}
        for i in range(rounds):
            order = [(baseline, old), ("this tree", str(ROOT))]
            for name, tree in order if i % 2 == 0 else order[::-1]:
                out = subprocess.run([sys.executable, "-c", LOAD, tree, str(path)], capture_output=True, text=True,
                                     check=True)
                times[name].append(float(out.stdout))
    return times


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=dataset.TRAIN_PATH)
    parser.add_argument("--baseline", help="a git revision: time loading --data with its code and with this tree")
    parser.add_argument("--rounds", type=int, default=10, help="loads of each in the timing (default: 10)")
    parser.add_argument("--timing-only", action="store_true", help="with --baseline: only the timing")
    args = parser.parse_args()
    dataset.ensure_data(args.data)
    if not args.timing_only:
        print_limits(args.data)
    if args.baseline:
        times = paired_load_times(args.baseline, args.data, args.rounds)
        print(f"\nloading {args.data} ({Path(args.data).stat().st_size / 1e6:.1f} MB), {args.rounds} loads each, in turn:")
        for name, seconds in times.items():
            print(f"  {name:<12} median {statistics.median(seconds):.2f} s, min {min(seconds):.2f} s, "
                  f"max {max(seconds):.2f} s")
        ratios = [new / old for old, new in zip(*times.values())]
        print(f"  this tree / {args.baseline}: median {statistics.median(ratios):.2f} (pairs of consecutive loads)")


def print_limits(data):
    """The table: every everyday file's use of every limit, then the largest use of each."""
    memo = count_memo_slots()
    images, labels = dataset.load_pickle(data)
    sizes = {"full size": (images, labels), "twice": (torch.cat([images, images.flip(3)]), torch.cat([labels] * 2))}
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for x, y in sizes.values():
            writers = {"the course format (dataset.save_pickle)": (dataset.as_course_list, 5), **WRITERS}
            for name, (make, protocol) in writers.items():
                path = tmp / "data.pickle"
                with open(path, "wb") as f:
                    pickle.dump(make(x, y), f, protocol=protocol)
                used, n = data_usage(path, memo)
                rows.append((f"{name}, {n:,} images", path.stat().st_size, used))
                path.unlink()
        for name, path in checkpoints(tmp, len(labels)).items():
            rows.append((name, path.stat().st_size, checkpoint_usage(path, memo)))
    print_rows(rows)
    print_summary(rows)
    built = bytes_per_instruction()
    print("\nPython memory one instruction builds, repeated: " + ", ".join(f"{k} {v:.0f} B" for k, v in built.items()))
    print(f"\nlimits of a file of S bytes: instructions max(S, {restricted_pickle.DATA_FLOOR:,}) / "
          f"{restricted_pickle.INSTRUCTION_BYTES} (zip checkpoints max(S, {restricted_pickle.ZIP_FLOOR:,}) / "
          f"{restricted_pickle.INSTRUCTION_BYTES}); tensor objects max(S, floor) / "
          f"{restricted_pickle.TENSOR_OBJECT_BYTES}; data built again S")


if __name__ == "__main__":
    run_main(main)
