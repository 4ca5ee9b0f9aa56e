"""Accuracy of each training configuration: the evidence behind every default.

    python bench/accuracy.py                      # all configurations (about 20 minutes on 2 CPU cores)
    python bench/accuracy.py --only seed default  # a subset, by name
    python bench/accuracy.py --seeds 0 1 2        # mean over seeds (runs vary by about 1 point)

Each configuration runs `trainer.py` with a fixed seed on the built data, then `tester.py`
on the dev set (plain and with flip averaging). Prints a table of per-class and balanced
dev accuracy and wall time, and writes it as JSON (--json).
"""
import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from cli import run_main  # noqa: E402
from dataset import CLASSES, DEV_PATH, TRAIN_PATH, ensure_data  # noqa: E402

# name -> (trainer flags, what it shows)
CONFIGS = {
    "seed": (["--schedule", "constant", "--fix-labels", "none"],
             "the seed's recipe: Adam 1e-3 constant, balanced sampler, augmentation, 60 epochs"),
    "no-sampler": (["--schedule", "constant", "--fix-labels", "none", "--sampler", "none"],
                   "seed recipe without the balanced sampler"),
    "no-augment": (["--schedule", "constant", "--fix-labels", "none", "--no-augment"],
                   "seed recipe without augmentation"),
    "onecycle": (["--fix-labels", "none"], "seed recipe + one-cycle learning-rate schedule"),
    "default": ([], "trainer.py defaults: one-cycle + automatic label repair"),
    "resnet8": (["--model", "resnet8"], "the stronger model (--model resnet8), with its defaults"),
}


def run(cmd):
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0:
        sys.exit(f"failed: {' '.join(map(str, cmd))}\n{result.stderr[-2000:]}")
    return result


def evaluate(name, flags, seed, work, args):
    """Train one configuration with one seed; dev accuracies plain and with flip TTA, and wall time."""
    ckpt = work / f"{name}_{seed}.ckpt"
    start = time.time()
    run([sys.executable, str(ROOT / "trainer.py"), "--seed", str(seed), "--data", args.data,
         "--dev-data", args.dev_data, "--out", str(ckpt), "--figures", str(work / name), *flags])
    row = {"name": name, "seed": seed, "flags": " ".join(flags), "seconds": round(time.time() - start, 1)}
    for tta in ("none", "flip"):
        run([sys.executable, str(ROOT / "tester.py"), "--checkpoint", str(ckpt), "--data", args.dev_data,
             "--out", str(work / name), "--tta", tta])
        metrics = json.loads((work / name / f"metrics_{ckpt.stem}.json").read_text())
        row[tta] = {c: metrics["per_class"][c]["accuracy"] for c in CLASSES}
        row[tta]["balanced"] = metrics["balanced_accuracy"]
    return row


def mean(rows, *keys):
    values = []
    for row in rows:
        for key in keys:
            row = row[key]
        values.append(row)
    return sum(values) / len(values)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", nargs="+", choices=list(CONFIGS), help="configurations to run (default: all)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0], help="seeds to average over (default: 0)")
    parser.add_argument("--data", default=TRAIN_PATH)
    parser.add_argument("--dev-data", default=DEV_PATH)
    parser.add_argument("--json", help="also write the rows here")
    args = parser.parse_args()
    ensure_data(args.data, args.dev_data)
    rows = []
    print(f"dev accuracy, mean over seeds {args.seeds}")
    print(f"{'configuration':<12} {'car':>6} {'truck':>6} {'cat':>6} {'balanced':>9} {'+flip TTA':>10} {'time':>6}")
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.only or CONFIGS:
            runs = [evaluate(name, CONFIGS[name][0], seed, Path(tmp), args) for seed in args.seeds]
            rows += runs
            print(f"{name:<12} " + " ".join(f"{mean(runs, 'none', c):6.3f}" for c in CLASSES) +
                  f" {mean(runs, 'none', 'balanced'):9.4f} {mean(runs, 'flip', 'balanced'):10.4f}"
                  f" {mean(runs, 'seconds'):5.0f}s", flush=True)
    for name in args.only or CONFIGS:
        print(f"  {name}: {CONFIGS[name][1]}")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    run_main(main)
