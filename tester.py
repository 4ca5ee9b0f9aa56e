"""Evaluate a checkpoint on the dev set: accuracy, balanced accuracy, per-class metrics, confusion matrix.

    python tester.py                                   # checkpoints/pre_trained.ckpt on data/dev.pickle
    python tester.py --checkpoint checkpoints/trained.ckpt
    python tester.py --checkpoint checkpoints/trained.ckpt --tta flip   # opt-in test-time augmentation
    python tester.py --checkpoint checkpoints/trained.ckpt --data my_photos/   # car/, truck/, cat/ subfolders
    python tester.py --checkpoint checkpoints/trained.ckpt --images a.jpg b.png more_photos/

Prints a metrics table and writes <out>/confusion_<checkpoint stem>.png and
<out>/metrics_<checkpoint stem>.json (out defaults to figures/). --data takes a course
pickle or a folder of class subfolders holding image files; --images predicts image files
without labels instead: a table of the three class probabilities per image,
<out>/predictions.json and a grid of thumbnails, <out>/predictions.png. The dev set is
imbalanced (1000 car, 250 truck, 500 cat), so plain accuracy rewards predicting
"car"; balanced accuracy (the mean of the per-class accuracies) is the number to compare.
By default the model is scored as it is (argmax of its logits, eval mode), so the numbers
equal any other plain evaluation of the same checkpoint; --tta flip is opt-in and named
in the output.

Prediction is models.predict, the scores metrics.compute_metrics: the same code that
trainer.py and adversarialExample.py score with. Image files are read by images.py.
"""
import json
import math
import re
import sys
import time
import warnings
from pathlib import Path

import numpy as np

from cli import ArgumentParser, atomic_write, check_output_dir, pick_device, positive_int, pyplot, run_main, save_figure
from dataset import CLASSES, DEV_PATH, FIGURES_DIR, load_labeled_data
from images import load_image_files, printable_path, to_unit, warn_skipped
from metrics import TTA_NAMES, compute_metrics, format_metrics
from models import load_model, predict

DEFAULT_CHECKPOINT = "checkpoints/pre_trained.ckpt"
GRID_MAX = 64  # thumbnails drawn in predictions.png; the table and JSON hold every image


def plot_confusion(metrics_or_matrix, path, title):
    """Save the confusion matrix as a PNG: cells show row-normalized percent and count.

    Accepts the compute_metrics dict or a 3x3 count matrix (rows true, columns predicted).
    """
    plt = pyplot()
    if isinstance(metrics_or_matrix, dict):
        metrics_or_matrix = metrics_or_matrix["confusion_matrix"]
    counts = np.asarray(metrics_or_matrix, dtype=np.int64)
    if counts.shape != (len(CLASSES), len(CLASSES)):
        raise ValueError(f"expected a {len(CLASSES)}x{len(CLASSES)} confusion matrix, got shape {counts.shape}")
    totals = counts.sum(1, keepdims=True)
    # Row percentages make the small truck row as readable as the large car row.
    percent = np.divide(100.0 * counts, totals, out=np.zeros(counts.shape), where=totals > 0)

    fig, ax = plt.subplots(figsize=(5.6, 4.6))
    image = ax.imshow(percent, cmap="Blues", vmin=0, vmax=100)
    for i in range(len(CLASSES)):
        for j in range(len(CLASSES)):
            color = "white" if percent[i, j] > 55 else "black"
            ax.text(j, i, f"{percent[i, j]:.1f}%\n({counts[i, j]})", ha="center", va="center", color=color, fontsize=11)
    ticks = range(len(CLASSES))
    ax.set_xticks(ticks, CLASSES)
    ax.set_yticks(ticks, [f"{name}\n(n={n})" for name, n in zip(CLASSES, totals.ravel())])
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    ax.set_title(title, fontsize=10)
    fig.colorbar(image, ax=ax, label="% of the true class")
    fig.tight_layout()
    save_figure(fig, path)


# ---------------------------------------------------------------------------
# Predictions for image files without labels (--images)


def prediction_records(paths, probs):
    """One JSON-ready dict per image, in input order: path, predicted class, its probability, all three."""
    records = []
    for path, p in zip(paths, probs.tolist()):
        best = max(range(len(CLASSES)), key=p.__getitem__)
        records.append({"path": printable_path(path), "predicted": CLASSES[best], "probability": round(p[best], 6),
                        "probabilities": {name: round(v, 6) for name, v in zip(CLASSES, p)}})
    return records


def format_predictions(records):
    """The prediction records as a text table: file, predicted class, the three probabilities."""
    width = max(len("file"), *(len(r["path"]) for r in records)) + 2
    lines = [f"{'file':<{width}}{'predicted':<11}" + "".join(f"{name:>8}" for name in CLASSES)]
    for r in records:
        lines.append(f"{r['path']:<{width}}{r['predicted']:<11}"
                     + "".join(f"{r['probabilities'][name]:>8.1%}" for name in CLASSES))
    return "\n".join(lines)


def plot_predictions(images, records, path, title):
    """A grid of the 32x32 images the model saw (at most GRID_MAX), each titled with its prediction."""
    plt = pyplot()
    shown = min(len(records), GRID_MAX)
    rows = math.ceil(shown / 8)  # at most 8 a row, rows filled evenly: 10 images are 2 rows of 5
    cols = math.ceil(shown / rows)
    fig, axes = plt.subplots(rows, cols, figsize=(1.45 * cols + 0.3, 1.7 * rows + 0.6), squeeze=False)
    for k, ax in enumerate(axes.flat):
        if k >= shown:
            ax.axis("off")
            continue
        ax.imshow(to_unit(images[k]).clamp(0, 1).permute(1, 2, 0).numpy())
        ax.set_xticks([])
        ax.set_yticks([])
        for spine in ax.spines.values():  # a thin frame, so a white background still shows its edge
            spine.set_color("lightgray")
        r = records[k]
        ax.set_title(f"{r['predicted']} {r['probability']:.0%}", fontsize=10)
        name = Path(r["path"]).name
        ax.text(0.5, -0.06, name if len(name) <= 20 else name[:9] + "…" + name[-10:], transform=ax.transAxes,
                ha="center", va="top", fontsize=7)
    if shown < len(records):
        title += f" (first {shown} of {len(records)})"
    fig.suptitle(title, fontsize=10)
    with warnings.catch_warnings():
        # A file name in a script the font lacks (Chinese, say) is drawn with boxes; matplotlib's
        # warning about each missing glyph would only add lines to the output.
        warnings.simplefilter("ignore", UserWarning)
        fig.tight_layout()
        save_figure(fig, path)


def predict_files(model, args, device, out):
    """--images: predict each file, print the table, write predictions.json and predictions.png."""
    images, paths, skipped = load_image_files(args.images, args.skip_bad)
    start = time.perf_counter()
    probs = predict(model, images, device, args.batch_size, flip=args.tta == "flip", probabilities=True)
    seconds = time.perf_counter() - start
    records = prediction_records(paths, probs)
    figure, predictions_json = out / "predictions.png", out / "predictions.json"
    report = {"checkpoint": str(args.checkpoint), "tta": args.tta, "n": len(records), "classes": list(CLASSES),
              "predictions": records, "skipped": skipped, "figure": str(figure)}

    print(f"{'checkpoint':<11} {args.checkpoint}")
    print(f"{'tta':<11} {TTA_NAMES[args.tta]}")
    print(f"{'images':<11} {len(records)}, each centre-cropped and resized to 32x32\n")
    print(format_predictions(records))
    print(f"\npredicted {len(records)} images in {seconds:.2f} s on {device}")

    stem = Path(args.checkpoint).stem
    plot_predictions(images, records, figure,
                     f"{stem}: predictions" + (" (flip TTA)" if args.tta == "flip" else ""))
    atomic_write(predictions_json, lambda f: f.write((json.dumps(report, indent=1) + "\n").encode()))
    print(f"saved {figure} and {predictions_json}")
    sys.stdout.flush()  # the table first, then the count of skipped files that ends the run
    warn_skipped(skipped, len(records))


# ---------------------------------------------------------------------------
# Command line


def _to_json(record):
    text = json.dumps(record, indent=2)
    # One line per confusion-matrix row, so the file reads like the matrix it stores. The
    # pattern needs real newlines, which json.dumps never leaves inside a string value.
    row = re.compile(r"\[\n\s*(-?\d+(?:,\n\s*-?\d+)*)\n\s*\]")
    return row.sub(lambda m: "[" + ", ".join(v.strip() for v in m[1].split(",")) + "]", text) + "\n"


def parse_args(argv=None):
    parser = ArgumentParser(description=__doc__)
    parser.add_argument("--checkpoint", default=DEFAULT_CHECKPOINT,
                        help=f"model checkpoint to evaluate (default: {DEFAULT_CHECKPOINT})")
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--data", default=DEV_PATH,
                        help="course data pickle, or a folder with class subfolders car/ (or automobile/), truck/ "
                             f"and cat/ holding image files, to evaluate on (default: {DEV_PATH}, built if missing)")
    source.add_argument("--images", nargs="+", metavar="FILE",
                        help="predict these image files, or the image files directly inside these folders, "
                             "instead of evaluating (JPEG, PNG, WebP, BMP, GIF): a table, predictions.json and "
                             "predictions.png in --out")
    parser.add_argument("--skip-bad", action="store_true",
                        help="skip image files that cannot be read (a warning line each and a count at the end) "
                             "instead of stopping at the first")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:N, mps or auto: CUDA, else MPS, else the CPU (default: auto)")
    parser.add_argument("--batch-size", type=positive_int, default=1000,
                        help="images per forward pass (default: 1000)")
    parser.add_argument("--out", default=FIGURES_DIR,
                        help=f"folder for the confusion figure and metrics JSON (default: {FIGURES_DIR})")
    # The default scores the model as it is, so tester.py agrees with any other evaluation of
    # the same checkpoint; flip averaging changes the number and must be asked for.
    parser.add_argument("--tta", choices=("none", "flip"), default="none",
                        help="test-time augmentation: 'none' scores the plain model; 'flip' averages with the "
                             "mirrored image (opt-in; named in the output) (default: none)")
    parser.add_argument("--cifar-dir", help="local CIFAR-10 copy used if the default data must be built")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    device = pick_device(args.device)
    out = check_output_dir(args.out, "--out")
    # The checkpoint first: a typo in its path should not wait for a data build.
    model = load_model(args.checkpoint).to(device)
    if args.images:
        return predict_files(model, args, device, out)
    images, labels, files, skipped = load_labeled_data(args.data, args.cifar_dir, args.skip_bad)

    start = time.perf_counter()
    predictions = predict(model, images, device, args.batch_size, flip=args.tta == "flip")
    seconds = time.perf_counter() - start
    metrics = compute_metrics(labels, predictions)
    record = {"checkpoint": str(args.checkpoint), "data": str(args.data), "n": metrics["n"], "tta": args.tta}
    record.update(metrics)
    if files is not None:  # an image folder: which files were left out (--skip-bad)
        record["skipped"] = skipped

    print(format_metrics(record))
    print(f"\npredicted {record['n']} images in {seconds:.2f} s on {device}")

    stem = Path(args.checkpoint).stem
    figure, metrics_json = out / f"confusion_{stem}.png", out / f"metrics_{stem}.json"
    title = f"{stem} on {Path(args.data).name}" + (" (flip TTA)" if args.tta == "flip" else "")
    title += f"\nbalanced accuracy {metrics['balanced_accuracy']:.1%}, accuracy {metrics['accuracy']:.1%}"
    plot_confusion(metrics, figure, title)
    atomic_write(metrics_json, lambda f: f.write(_to_json(record).encode()))
    print(f"saved {figure} and {metrics_json}")
    sys.stdout.flush()
    warn_skipped(skipped, len(labels))


if __name__ == "__main__":
    run_main(main)
