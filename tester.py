"""Evaluate a checkpoint on the dev set: accuracy, balanced accuracy, per-class metrics, confusion matrix,
the most-confused pairs, the highest-loss mistakes and calibration.

    python tester.py                                   # checkpoints/pre_trained.ckpt on data/dev.pickle
    python tester.py --checkpoint checkpoints/trained.ckpt
    python tester.py --checkpoint checkpoints/trained.ckpt --explain    # Grad-CAM beside each mistake
    python tester.py --checkpoint checkpoints/trained.ckpt --tta flip   # opt-in test-time augmentation
    python tester.py --checkpoint checkpoints/trained.ckpt --data my_photos/   # car/, truck/, cat/ subfolders
    python tester.py --checkpoint checkpoints/trained.ckpt --images a.jpg b.png more_photos/

Prints a metrics table (with the expected calibration error) and the most-confused pairs,
and writes to <out> (default figures/), <stem> being the checkpoint's file name without its
extension: confusion_<stem>.png, calibration_<stem>.png (a reliability diagram),
mistakes_<stem>.png (the --mistakes K highest-loss errors, grouped by confused pair, each
with its index in the pickle or its file name) and metrics_<stem>.json holding every
number. --explain draws a Grad-CAM map (explain.py, Captum) beside each mistake or
--images prediction. --data takes a course pickle or a folder of class subfolders holding
image files; --images predicts image files without labels instead: a table of the three
class probabilities per image, <out>/predictions.json and a grid of thumbnails,
<out>/predictions.png. The dev set is imbalanced (1000 car, 250 truck, 500 cat), so plain
accuracy rewards predicting "car"; balanced accuracy (the mean of the per-class
accuracies) is the number to compare. By default the model is scored as it is (argmax of
its logits, eval mode), so the numbers equal any other plain evaluation of the same
checkpoint; --tta flip is opt-in and named in the output.

Prediction is models.predict, the scores metrics.compute_metrics: the same code that
trainer.py and adversarialExample.py score with. The confused pairs, the mistakes and
calibration are metrics.py's too, Grad-CAM is explain.py's (imported only with --explain),
and image files are read by images.py.
"""
import json
import math
import re
import sys
import time
import warnings
from pathlib import Path

import numpy as np

from cli import (ArgumentParser, atomic_write, check_output_dir, int_in, pick_device, positive_int, pyplot, run_main,
                 save_figure)
from dataset import CLASSES, DEV_PATH, FIGURES_DIR, load_labeled_data
from images import load_image_files, printable_path, to_unit, warn_skipped
from metrics import TTA_NAMES, calibration, compute_metrics, format_metrics, most_confused, top_losses
from models import load_model, predict

DEFAULT_CHECKPOINT = "checkpoints/pre_trained.ckpt"
GRID_MAX = 64  # thumbnails drawn in predictions.png; the table and JSON hold every image
DEFAULT_MISTAKES = 24  # three rows of eight in mistakes_<stem>.png


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
    ax.set_title(title, fontsize=10, parse_math=False)  # a "$" in a file name is not TeX
    fig.colorbar(image, ax=ax, label="% of the true class")
    fig.tight_layout()
    save_figure(fig, path)


def plot_calibration(result, path, title):
    """Reliability diagram of calibration(): accuracy against mean confidence per bin, over a
    histogram of how many images fall in each bin."""
    plt = pyplot()
    curve, bins = result["curve"], result["bins"]
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(5, 5.6), sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    top.plot([0, 1], [0, 1], ls="--", color="gray", lw=1, label="perfectly calibrated")
    top.plot(curve["confidence"], curve["accuracy"], "o-", color="tab:blue", label="model (one point per bin)")
    top.set_ylabel("accuracy in the bin")
    top.set_ylim(0, 1.02)
    top.legend(loc="upper left", fontsize=8)
    top.set_title(title, fontsize=10, parse_math=False)
    edges = np.linspace(0, 1, bins + 1)
    # A bin's mean confidence lies inside it: ceil(confidence x bins) - 1 is its bin.
    index = np.clip(np.ceil(np.asarray(curve["confidence"]) * bins).astype(int) - 1, 0, bins - 1)
    bottom.bar(edges[index], curve["count"], width=1 / bins, align="edge", color="tab:blue", alpha=0.6,
               edgecolor="white")
    bottom.set_yscale("log")
    bottom.set_ylabel("images")
    bottom.set_xlabel("confidence (probability of the predicted class)")
    bottom.set_xlim(0, 1)
    fig.tight_layout()
    save_figure(fig, path)


# ---------------------------------------------------------------------------
# Image grids: predictions, mistakes, each tile optionally with its Grad-CAM map


def _short(name, limit=20):
    return name if len(name) <= limit else name[:9] + "…" + name[-10:]


def draw_tiles(rows, path, title, row_labels=None):
    """Save a grid of image tiles, one list of (image [3, 32, 32], title, caption, cam or None) per row.

    A tile with a cam gets a second panel to its right: the image under its Grad-CAM map,
    scaled to the map's maximum (red: most evidence for the class named in the title).
    row_labels: text at the left of each row (or None).
    """
    plt = pyplot()
    explain = any(tile[3] is not None for row in rows for tile in row)
    panels = 2 if explain else 1
    cols = max(len(row) for row in rows) * panels
    title_height = 0.2 * (title.count("\n") + 1)  # inches
    fig, axes = plt.subplots(len(rows), cols, figsize=(1.45 * cols + 0.3 + 0.6 * bool(row_labels),
                                                        1.7 * len(rows) + 0.4 + title_height), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for r, row in enumerate(rows):
        for k, (image, tile_title, caption, cam) in enumerate(row):
            ax = axes[r, k * panels]
            ax.axis("on")
            pixels = to_unit(image).clamp(0, 1).permute(1, 2, 0).numpy()
            ax.imshow(pixels)
            ax.set_xticks([])
            ax.set_yticks([])
            for spine in ax.spines.values():  # a thin frame, so a white background still shows its edge
                spine.set_color("lightgray")
            ax.set_title(tile_title, fontsize=9)
            ax.set_xlabel(_short(caption), fontsize=7, labelpad=2, parse_math=False)  # "$" in a name is a "$"
            if r < len(row_labels or ()) and k == 0:
                ax.set_ylabel(row_labels[r], fontsize=9)
            if cam is not None:
                overlay = axes[r, k * panels + 1]
                peak = float(cam.max())
                overlay.imshow(pixels.mean(2), cmap="gray", vmin=0, vmax=1)
                overlay.imshow((cam / peak if peak > 0 else cam).numpy(), cmap="jet", alpha=0.5, vmin=0, vmax=1)
                overlay.set_title("Grad-CAM" if peak > 0 else "Grad-CAM: 0", fontsize=8)
    fig.suptitle(title, fontsize=10, parse_math=False)
    with warnings.catch_warnings():
        # A file name in a script the font lacks (Chinese, say) is drawn with boxes; matplotlib's
        # warning about each missing glyph would only add lines to the output.
        warnings.simplefilter("ignore", UserWarning)
        fig.tight_layout()
        save_figure(fig, path)


def plot_mistakes(images, mistakes, path, title, cams=None, per_row=8):
    """The mistakes (top_losses records, highest loss first) as a grid grouped by confused pair:
    the pair with most of them first, each group starting a row, highest loss first within it.
    Tiles show true -> predicted, the predicted class's probability and the image's "file" or
    "#index"; cams: a Grad-CAM map beside each."""
    if not mistakes:
        plt = pyplot()
        fig, ax = plt.subplots(figsize=(4, 1.2))
        ax.axis("off")
        ax.text(0.5, 0.5, "no mistakes: every image is predicted right", ha="center", va="center")
        fig.suptitle(title, fontsize=10, parse_math=False)
        return save_figure(fig, path)
    if cams is not None:
        per_row //= 2
    groups = {}
    for k, m in enumerate(mistakes):
        groups.setdefault((m["true"], m["predicted"]), []).append(k)
    rows, labels = [], []
    for (true, predicted), members in sorted(groups.items(), key=lambda item: -len(item[1])):  # stable
        for i in range(0, len(members), per_row):
            rows.append([(images[k], f"{true}→{predicted} {mistakes[k]['probability']:.0%}",
                          Path(mistakes[k]["file"]).name if "file" in mistakes[k] else f"#{mistakes[k]['index']}",
                          None if cams is None else cams[k])
                         for k in members[i : i + per_row]])
            labels.append(f"{true} → {predicted}\n({len(members)})" if i == 0 else "")
    draw_tiles(rows, path, title, labels)


def draw_mistakes(model, images, predictions, record, args, device, path, on):
    """mistakes_<stem>.png: record's mistakes, with their Grad-CAM maps under --explain."""
    mistakes = record["mistakes"]
    shown = [m["index"] for m in mistakes]
    cams = explain_predictions(model, images[shown], predictions[shown], args, device)
    errors = sum(pair["count"] for pair in record["most_confused"])
    which = f"the {len(mistakes)} highest-loss of {errors} mistakes" if len(mistakes) < errors else \
        f"all {errors} mistake{'s' * (errors != 1)}" if errors else "no mistakes"
    plot_mistakes(images[shown], mistakes, path,
                  f"{on}: {which}" + ("\nGrad-CAM for the predicted class" if cams is not None else ""), cams)


def explain_predictions(model, images, predicted, args, device):
    """--explain: Grad-CAM maps of images for their predicted classes (None without --explain)."""
    if not args.explain or len(images) == 0:
        return None
    from explain import grad_cam  # Captum is needed only here

    return grad_cam(model, images, predicted, device, flip=args.tta == "flip")


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


def plot_predictions(images, records, path, title, cams=None):
    """A grid of the 32x32 images the model saw (at most GRID_MAX), each titled with its prediction;
    cams: a Grad-CAM map beside each (--explain)."""
    shown = min(len(records), GRID_MAX)
    per_row = 8 if cams is None else 4
    rows = math.ceil(shown / per_row)  # rows filled evenly: 10 images are 2 rows of 5
    cols = math.ceil(shown / rows)
    tiles = [(images[k], f"{r['predicted']} {r['probability']:.0%}", Path(r["path"]).name,
              None if cams is None else cams[k]) for k, r in enumerate(records[:shown])]
    if shown < len(records):
        title += f" (first {shown} of {len(records)})"
    draw_tiles([tiles[i : i + cols] for i in range(0, shown, cols)], path, title)


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
    shown = images[:GRID_MAX]
    cams = explain_predictions(model, shown, probs[:GRID_MAX].argmax(1), args, device)
    plot_predictions(images, records, figure, f"{stem}: predictions" + (" (flip TTA)" if args.tta == "flip" else "")
                     + (", Grad-CAM for the predicted class" if args.explain else ""), cams)
    atomic_write(predictions_json, lambda f: f.write((json.dumps(report, indent=1) + "\n").encode()))
    print(f"saved {figure} and {predictions_json}")
    sys.stdout.flush()  # the table first, then the count of skipped files that ends the run
    warn_skipped(skipped, len(records))


# ---------------------------------------------------------------------------
# Command line


def _to_json(record):
    text = json.dumps(record, indent=2)
    # One line per list of numbers (a confusion-matrix row, a calibration curve), so the file
    # reads like the matrix it stores. The pattern needs real newlines, which json.dumps never
    # leaves inside a string value.
    number = r"-?\d+(?:\.\d+)?(?:[eE][-+]?\d+)?"
    row = re.compile(rf"\[\n\s*({number}(?:,\n\s*{number})*)\n\s*\]")
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
                        help=f"folder for the figures and the metrics JSON (default: {FIGURES_DIR})")
    # The default scores the model as it is, so tester.py agrees with any other evaluation of
    # the same checkpoint; flip averaging changes the number and must be asked for.
    parser.add_argument("--tta", choices=("none", "flip"), default="none",
                        help="test-time augmentation: 'none' scores the plain model; 'flip' averages with the "
                             "mirrored image (opt-in; named in the output) (default: none)")
    parser.add_argument("--mistakes", type=int_in(0), metavar="K",
                        help="draw the K misclassified images with the highest loss, grouped by confused pair, "
                             f"in mistakes_<stem>.png and list them in the JSON; 0: none (default: {DEFAULT_MISTAKES})")
    parser.add_argument("--explain", action="store_true",
                        help="draw a Grad-CAM map (Captum, the last convolutional layer) beside each mistake or "
                             "--images prediction: where the model saw evidence for the class it predicted")
    parser.add_argument("--cifar-dir", help="local CIFAR-10 copy used if the default data must be built")
    args = parser.parse_args(argv)
    if args.images and args.mistakes is not None:
        parser.error("--mistakes applies to an evaluation (--data); --images predicts files without labels")
    if args.mistakes is None:
        args.mistakes = DEFAULT_MISTAKES
    if args.explain and not args.images and args.mistakes == 0:
        parser.error("--explain draws Grad-CAM beside the mistakes or --images predictions; with --mistakes 0 "
                     "there is nothing to draw")
    return args


def main(argv=None):
    args = parse_args(argv)
    device = pick_device(args.device)
    out = check_output_dir(args.out, "--out", create=False)  # made when written: a refused run leaves none
    if args.explain:  # a missing Captum should not wait for the data
        from explain import require_captum

        require_captum()
    # The checkpoint first: a typo in its path should not wait for a data build.
    model = load_model(args.checkpoint).to(device)
    if args.images:
        return predict_files(model, args, device, out)
    images, labels, files, skipped = load_labeled_data(args.data, args.cifar_dir, args.skip_bad)

    start = time.perf_counter()
    flip = args.tta == "flip"
    # The labels scored are predict's own (the argmax of the logits, or of the flip-averaged
    # probabilities), so the metrics equal any other evaluation; the probabilities feed
    # calibration and the mistakes' losses.
    predictions, probs = predict(model, images, device, args.batch_size, flip=flip, both=True)
    seconds = time.perf_counter() - start
    metrics = compute_metrics(labels, predictions)
    record = {"checkpoint": str(args.checkpoint), "data": str(args.data), "n": metrics["n"], "tta": args.tta}
    record.update(metrics)
    record["most_confused"] = most_confused(metrics["confusion_matrix"])
    record["calibration"] = calibration(labels, predictions, probs)
    if args.mistakes:
        record["mistakes"] = top_losses(labels, predictions, probs, args.mistakes)
        for m in record["mistakes"] if files is not None else ():
            m["file"] = printable_path(files[m["index"]])  # with its index: where it is in the folder's listing
    if files is not None:  # an image folder: which files were left out (--skip-bad)
        record["skipped"] = skipped

    print(format_metrics(record))
    print(f"\npredicted {record['n']} images in {seconds:.2f} s on {device}")

    stem = Path(args.checkpoint).stem
    figures = [out / f"confusion_{stem}.png", out / f"calibration_{stem}.png"]
    on = f"{stem} on {Path(args.data).name}" + (" (flip TTA)" if flip else "")
    title = f"{on}\nbalanced accuracy {metrics['balanced_accuracy']:.1%}, accuracy {metrics['accuracy']:.1%}"
    plot_confusion(metrics, figures[0], title)
    plot_calibration(record["calibration"], figures[1],
                     f"{on}\nECE {record['calibration']['ece']:.1%} (top-label, {record['calibration']['bins']} bins)")
    if args.mistakes:
        figures.append(out / f"mistakes_{stem}.png")
        draw_mistakes(model, images, predictions, record, args, device, figures[-1], on)
    metrics_json = out / f"metrics_{stem}.json"
    atomic_write(metrics_json, lambda f: f.write(_to_json(record).encode()))
    print(f"saved {', '.join(map(str, figures))} and {metrics_json}")
    sys.stdout.flush()
    warn_skipped(skipped, len(labels))


if __name__ == "__main__":
    run_main(main)
