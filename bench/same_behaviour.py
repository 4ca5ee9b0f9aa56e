"""Does a change keep behaviour? Run the same commands on an earlier commit and on this tree; compare.

    python bench/same_behaviour.py --baseline c7c7e9c

Exports --baseline (any git revision) into a temporary folder, builds one small data set from
the local CIFAR-10 copy, and runs every command below with both versions of the scripts,
the two versions side by side, one thread each. It then compares, bit for bit, the weights
of every checkpoint the runs wrote, the JSON reports (timings left out) and everything the
scripts printed to stdout (lines with a timing left out). A report whose numbers differ only
in float rounding (relative 1e-6) is listed as "same to 1e-6" and counted as a difference.
Exit status 0 when everything is identical, 1 otherwise.
"""
import argparse
import concurrent.futures
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from cli import UserError, run_main  # noqa: E402
from dataset import build_from_cifar, cifar_source  # noqa: E402

# (name, script, arguments); "@NAME" stands for the checkpoint that run NAME trained. Training runs get
# the data, tester and adversarialExample the dev set; every run writes into a folder of its own.
RUNS = [
    ("default", "trainer.py", ["--epochs", "3", "--fix-labels", "auto", "--repair-epochs", "2"]),
    ("best", "trainer.py", ["--model", "best", "--epochs", "2", "--fix-labels", "auto", "--repair-epochs", "1"]),
    ("fgsm-rs", "trainer.py", ["--adversarial", "fgsm-rs", "--epochs", "1", "--fix-labels", "none",
                               "--robust-eval", "100"]),
    ("pgd", "trainer.py", ["--adversarial", "pgd", "--adv-steps", "2", "--epochs", "1", "--fix-labels", "none",
                           "--robust-eval", "64"]),
    ("treatments", "trainer.py", ["--loss", "logit-adjusted", "--tau", "0.5", "--mix", "mixup", "--ema", "0.99",
                                  "--val-fraction", "0.1", "--select", "best-val", "--drw-start", "2",
                                  "--epochs", "3", "--fix-labels", "none"]),
    ("repair-drop", "trainer.py", ["--epochs", "1", "--fix-labels", "auto", "--repair-epochs", "1", "--repair-action", "drop",
                                   "--sampler", "sqrt"]),
    ("repair-best", "trainer.py", ["--model", "best", "--epochs", "1", "--fix-labels", "auto", "--repair-model", "best",
                                   "--repair-epochs", "1",
                                   "--repair-folds", "2"]),
    ("lr-sweep", "trainer.py", ["--lr-sweep", "1e-3", "1e-1", "--sweep-steps", "40"]),
    ("tester", "tester.py", ["--checkpoint", "@default"]),
    ("tester-flip", "tester.py", ["--checkpoint", "@best", "--tta", "flip"]),
    ("fgsm-study", "adversarialExample.py", ["--checkpoint", "@default", "--examples", "4"]),
    ("pgd-study", "adversarialExample.py", ["--checkpoint", "@fgsm-rs", "--attack", "pgd", "--steps", "5",
                                            "--restarts", "2", "--epsilons", "0", "2/255", "8/255", "0.3"]),
    ("targeted", "adversarialExample.py", ["--checkpoint", "@default", "--target", "cat", "--attack", "pgd",
                                           "--steps", "3", "--epsilons", "0", "0.03"]),
    ("compare", "adversarialExample.py", ["--compare", "@default", "@fgsm-rs", "--attack", "pgd",
                                          "--steps", "3", "--epsilons", "0", "4/255", "--transfer-from",
                                          "@best"]),
]
TIMING = re.compile(r"\d+(\.\d+)?\s?s\b|took|in \d+\.\d+ s|\(\d+s\)|[\d.]+s/it|it/s")
JSON_TIMINGS = {"train_seconds", "seconds"}


def export(revision, folder):
    """The project files at revision, written into folder (git archive)."""
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", revision], capture_output=True)
    if archive.returncode:
        raise UserError(f"--baseline {revision}: {archive.stderr.decode().strip()}")
    subprocess.run(["tar", "-x", "-C", str(folder)], input=archive.stdout, check=True)


def run(tree, work, name, script, args):
    """Run script from tree with args in work/name; return the CompletedProcess."""
    out_dir = work / name
    out_dir.mkdir(parents=True, exist_ok=True)
    data = work.parent / "data"
    args = [str(work / a[1:] / "model.ckpt") if a.startswith("@") else a for a in args]
    if script == "trainer.py":
        args += ["--data", data / "train.pickle", "--dev-data", data / "dev.pickle", "--out", out_dir / "model.ckpt",
                 "--figures", out_dir / "figures"]
    else:
        args += ["--data", data / "dev.pickle", "--out", out_dir / "figures"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "MPLBACKEND": "Agg"}
    return subprocess.run([sys.executable, str(tree / script), *map(str, args)], cwd=out_dir, env=env,
                          capture_output=True, text=True)


def stdout_lines(text, work):
    """The lines without timings, the run's own folder written as <work>."""
    return [line.replace(str(work), "<work>") for line in text.splitlines() if not TIMING.search(line)]


def without_timings(value):
    if isinstance(value, dict):
        return {k: without_timings(v) for k, v in value.items() if k not in JSON_TIMINGS}
    if isinstance(value, list):
        return [without_timings(v) for v in value]
    return value


def close(a, b, rel=1e-6):
    """a and b equal, floats to a relative rel."""
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(close(a[k], b[k], rel) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(close(x, y, rel) for x, y in zip(a, b))
    if isinstance(a, float) and isinstance(b, float):
        return abs(a - b) <= rel * max(abs(a), abs(b))
    return a == b


def compare_trees(before, after):
    """[(what, verdict)] for every checkpoint and JSON report of the two work folders: "same", "same to 1e-6"
    or "DIFFERS"."""
    findings = []
    for ckpt in sorted(before.rglob("*.ckpt")):
        twin = after / ckpt.relative_to(before)
        a, b = torch.load(ckpt, weights_only=True), torch.load(twin, weights_only=True) if twin.exists() else None
        same = b is not None and a.keys() == b.keys() and a.get("arch") == b.get("arch") and all(
            torch.equal(a["model_state_dict"][k], b["model_state_dict"][k]) for k in a["model_state_dict"])
        findings.append((f"weights {ckpt.relative_to(before)}", "same" if same else "DIFFERS"))
    for report in sorted(before.rglob("*.json")):
        twin = after / report.relative_to(before)
        old = without_timings(json.loads(report.read_text().replace(str(before.parent), "<work>")))
        new = without_timings(json.loads(twin.read_text().replace(str(after.parent), "<work>"))) \
            if twin.exists() else None
        verdict = "same" if old == new else "same to 1e-6" if close(old, new) else "DIFFERS"
        findings.append((f"report {report.relative_to(before)}", verdict))
    return findings


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--baseline", required=True, help="git revision to compare against (e.g. a commit id)")
    parser.add_argument("--cifar-dir", help="local CIFAR-10 copy (default: $CIFAR10_DIR)")
    parser.add_argument("--keep", help="keep the work folders here instead of a temporary folder")
    args = parser.parse_args()
    root = Path(args.keep or tempfile.mkdtemp(prefix="same-behaviour-"))
    for name in ("old", "new", "data"):  # names of one length: paths in the output line up alike
        (root / name).mkdir(parents=True, exist_ok=True)
    baseline_tree = root / "baseline-tree"
    baseline_tree.mkdir(exist_ok=True)
    export(args.baseline, baseline_tree)
    source = cifar_source(args.cifar_dir)
    if source is None:
        raise UserError("no local CIFAR-10 copy: pass --cifar-dir or set CIFAR10_DIR")
    build_from_cifar(source, root / "data", seed=3, train_counts=(1200, 150, 600), dev_counts=(300, 80, 150),
                     mislabeled=180, quiet=True)
    started, failures = time.time(), 0
    for name, script, run_args in RUNS:
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            old = pool.submit(run, baseline_tree, root / "old", name, script, run_args)
            new = pool.submit(run, ROOT, root / "new", name, script, run_args)
            old, new = old.result(), new.result()
        ok = old.returncode == 0 and new.returncode == 0
        old_lines, new_lines = stdout_lines(old.stdout, root / "old"), stdout_lines(new.stdout, root / "new")
        same_stdout = old_lines == new_lines
        findings = compare_trees(root / "old" / name, root / "new" / name) if ok else []
        same = ok and same_stdout and all(verdict == "same" for _, verdict in findings)
        failures += not same
        print(f"{name:<12} {script:<22} {'same' if same else 'DIFFERENT'}: stdout {'same' if same_stdout else 'differs'}"
              f" ({len(new_lines)} lines), " + ", ".join(f"{what} {verdict}" for what, verdict in findings), flush=True)
        if not ok:
            print(f"  exit status {old.returncode} before, {new.returncode} after\n  before: {old.stderr[-500:]}\n"
                  f"  after: {new.stderr[-500:]}")
        elif not same_stdout:
            for a, b in zip(old_lines, new_lines):
                if a != b:
                    print(f"  before: {a}\n  after:  {b}")
    print(f"{len(RUNS) - failures} of {len(RUNS)} runs unchanged ({time.time() - started:.0f} s); work folders in {root}")
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    run_main(main)
