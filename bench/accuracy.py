"""Accuracy of each training configuration: the evidence behind every default.

    python bench/accuracy.py --only default best           # a subset, by name (3 seeds each)
    python bench/accuracy.py --seeds 0 1 2 3 4             # more seeds (runs vary by about 1.4 points)
    python bench/accuracy.py --data data-tune/train.pickle --dev-data data-tune/dev.pickle   # tuning set

Each configuration runs `trainer.py` once per seed on the built data, then `tester.py --tta
none` on the dev set. Prints, per configuration, the mean and the (min-max) range over the
seeds of per-class and balanced accuracy and of the wall time, and writes every run as JSON
(--json). All configurations with 3 seeds take hours on 2 CPU cores.
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
    "default": ([], "trainer.py defaults: balanced sampler, augmentation, one-cycle (no label repair)"),
    "repair": (["--fix-labels", "auto"], "defaults + automatic label repair (opt-in; the default before issue #22)"),
    "true-labels": (["--fix-labels", "{true labels}"],
                    "defaults with the manifest's true labels (what a perfect repair would give)"),
    "resnet8": (["--model", "resnet8"], "the stronger model (--model resnet8), with its defaults"),
    # The imbalance study (#11): each treatment on top of the default recipe, then on --model best.
    "la": (["--loss", "logit-adjusted", "--tau", "0.5"], "default + logit-adjusted loss, tau 0.5, beside the sampler"),
    "la-no-sampler": (["--sampler", "none", "--loss", "logit-adjusted", "--tau", "1"],
                      "default with logit adjustment (tau 1) instead of the sampler"),
    "sqrt-la": (["--sampler", "sqrt", "--loss", "logit-adjusted", "--tau", "0.5"],
                "default with the sqrt-count sampler + logit adjustment tau 0.5 (balanced in expectation)"),
    "drw": (["--drw-start", "46"], "default + deferred re-balancing: plain shuffling for epochs 1-45"),
    "mixup": (["--mix", "mixup"], "default + mixup"),
    "cutmix": (["--mix", "cutmix"], "default + cutmix"),
    "ema": (["--ema", "0.999"], "default + weight averaging (EMA 0.999)"),
    "best": (["--model", "best"], "--model best: WhitenedCNN, 15 epochs, cutmix"),
    "best-no-mix": (["--model", "best", "--mix", "none"], "--model best without cutmix"),
    "best-mixup": (["--model", "best", "--mix", "mixup"], "--model best with mixup instead of cutmix"),
    "best-ema": (["--model", "best", "--ema", "0.99"], "--model best + EMA 0.99"),
    "best-la": (["--model", "best", "--loss", "logit-adjusted", "--tau", "0.5"],
                "--model best + logit-adjusted loss, tau 0.5"),
    "best-sqrt-la": (["--model", "best", "--sampler", "sqrt", "--loss", "logit-adjusted", "--tau", "0.5"],
                     "--model best with the sqrt-count sampler + logit adjustment tau 0.5"),
    "best-la-no-sampler": (["--model", "best", "--sampler", "none", "--loss", "logit-adjusted", "--tau", "1"],
                           "--model best with logit adjustment (tau 1) instead of the sampler"),
    "best-25-epochs": (["--model", "best", "--epochs", "25"], "--model best trained 25 epochs instead of 15"),
    # bfloat16 autocast (#28): does it cost accuracy?
    "amp": (["--amp"], "default + --amp (bfloat16 autocast)"),
    "best-amp": (["--model", "best", "--amp"], "--model best + --amp (bfloat16 autocast)"),
}


def run(cmd):
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0:
        sys.exit(f"failed: {' '.join(map(str, cmd))}\n{result.stderr[-2000:]}")
    return result


def evaluate(name, flags, seed, work, args):
    """Train one configuration with one seed; dev accuracies plain and with flip TTA, and wall time."""
    ckpt = work / f"{name}_{seed}.ckpt"
    if "{true labels}" in flags:  # a --fix-labels file that puts every planted error right, from the manifest
        manifest = json.loads((Path(args.data).parent / "manifest.json").read_text())
        fixes = work / "true_labels.json"
        fixes.write_text(json.dumps([{"index": e["index"], "label": e["true"]} for e in manifest["mislabeled"]]))
        flags = [str(fixes) if f == "{true labels}" else f for f in flags]
    start = time.time()
    run([sys.executable, str(ROOT / "trainer.py"), "--seed", str(seed), "--data", args.data,
         "--dev-data", args.dev_data, "--out", str(ckpt), "--figures", str(work / name), *flags])
    row = {"name": name, "seed": seed, "flags": " ".join(flags), "seconds": round(time.time() - start, 1)}
    for tta in ("none", "flip") if args.flip_tta else ("none",):
        run([sys.executable, str(ROOT / "tester.py"), "--checkpoint", str(ckpt), "--data", args.dev_data,
             "--out", str(work / name), "--tta", tta])
        metrics = json.loads((work / name / f"metrics_{ckpt.stem}.json").read_text())
        row[tta] = {c: metrics["per_class"][c]["accuracy"] for c in CLASSES}
        row[tta]["balanced"] = metrics["balanced_accuracy"]
    return row


def values(rows, *keys):
    out = []
    for row in rows:
        for key in keys:
            row = row[key]
        out.append(row)
    return out


def spread(rows, *keys, digits=3):
    """mean (min-max) over seeds."""
    v = values(rows, *keys)
    return f"{sum(v) / len(v):.{digits}f} ({min(v):.{digits}f}-{max(v):.{digits}f})"


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", nargs="+", choices=list(CONFIGS), help="configurations to run (default: all)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2],
                        help="seeds to run each configuration with (default: 0 1 2)")
    parser.add_argument("--data", default=TRAIN_PATH)
    parser.add_argument("--dev-data", default=DEV_PATH)
    parser.add_argument("--flip-tta", action="store_true",
                        help="also score with flip averaging (tester.py --tta flip); the table's numbers are "
                             "always the plain model")
    parser.add_argument("--json", help="also write the rows here")
    args = parser.parse_args()
    ensure_data(args.data, args.dev_data)
    rows = []
    print(f"{args.dev_data}: accuracy of the plain model (tester.py --tta none), "
          f"mean (min-max) over seeds {' '.join(map(str, args.seeds))}; time: whole trainer.py run, wall clock")
    header = f"{'configuration':<18} {'car':>6} {'truck':>19} {'cat':>6} {'balanced':>19} {'time (s)':>15}"
    print(header + (f" {'+flip TTA':>10}" if args.flip_tta else ""))
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.only or CONFIGS:
            runs = [evaluate(name, CONFIGS[name][0], seed, Path(tmp), args) for seed in args.seeds]
            rows += runs
            line = (f"{name:<18} {spread(runs, 'none', 'car')[:5]:>6} {spread(runs, 'none', 'truck'):>19} "
                    f"{spread(runs, 'none', 'cat')[:5]:>6} {spread(runs, 'none', 'balanced'):>19} "
                    f"{spread(runs, 'seconds', digits=0):>15}")
            if args.flip_tta:
                line += f" {spread(runs, 'flip', 'balanced')[:5]:>10}"
            print(line, flush=True)
    for name in args.only or CONFIGS:
        print(f"  {name}: {CONFIGS[name][1]}")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    run_main(main)
