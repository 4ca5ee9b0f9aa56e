"""Confidence and mistakes of groups of checkpoints: calibration, the confused pairs, where Grad-CAM looks.

    python bench/mistakes.py --group default checkpoints/s0.ckpt checkpoints/s1.ckpt checkpoints/s2.ckpt \
                             --group sampler-none checkpoints/none_s0.ckpt checkpoints/none_s1.ckpt ...

For every checkpoint, on the dev set (--data, default data/dev.pickle), with the plain model
(no test-time augmentation), exactly as tester.py scores it: accuracy, balanced accuracy,
top-label ECE (15 bins), mean confidence, and per predicted class its mean confidence against
its precision; the share of all errors that are truck -> car; among the --top highest-loss
mistakes (tester.py's figure) how many are truck -> car and their mean probability of "car";
and the Grad-CAM map (explain.py, for the predicted class) of every truck the model calls a
car against every truck it gets right (and every car it gets right): the share of the
map's mass in the central 16x16 pixels (a quarter of the image) and in the lower half. Each group is printed as the mean
(min-max) over its checkpoints.
"""
import argparse
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from cli import pick_device  # noqa: E402
from dataset import CLASSES, DEV_PATH, ensure_data, load_pickle  # noqa: E402
from explain import grad_cam  # noqa: E402
from metrics import calibration, compute_metrics, top_losses  # noqa: E402
from models import load_model, predict  # noqa: E402

CAR, TRUCK = CLASSES.index("car"), CLASSES.index("truck")


def mass_shares(maps):
    """Per map: the share of its mass in the central half (by side) and in the lower half of the image."""
    total = maps.flatten(1).sum(1)
    h, w = maps.shape[-2:]
    centre = maps[:, h // 4 : h - h // 4, w // 4 : w - w // 4].flatten(1).sum(1)
    lower = maps[:, h // 2 :].flatten(1).sum(1)
    keep = total > 0  # a map of zeros (no evidence for the class) has no mass to share
    return (centre[keep] / total[keep]).mean().item(), (lower[keep] / total[keep]).mean().item()


def measure(checkpoint, images, labels, top, device):
    model = load_model(checkpoint).to(device)
    predictions = predict(model, images, device)
    probs = predict(model, images, device, probabilities=True)
    m = compute_metrics(labels, predictions)
    c = calibration(labels, predictions, probs)
    confidence = probs.gather(1, predictions[:, None])[:, 0]
    errors = int((predictions != labels).sum())
    truck_car = (labels == TRUCK) & (predictions == CAR)
    right_trucks = (labels == TRUCK) & (predictions == TRUCK)
    mistakes = [x for x in top_losses(labels, predictions, probs, top) if (x["true"], x["predicted"]) == ("truck", "car")]
    row = {"balanced accuracy": m["balanced_accuracy"], "accuracy": m["accuracy"], "ECE": c["ece"],
           "mean confidence": c["mean_confidence"], "confidence - accuracy": c["mean_confidence"] - c["accuracy"]}
    for k, name in enumerate(CLASSES):
        chosen = predictions == k
        row[f"predicted {name}: mean confidence"] = confidence[chosen].mean().item() if chosen.any() else float("nan")
        row[f"predicted {name}: precision"] = m["per_class"][name]["precision"]
    row["errors"] = errors
    row["truck -> car, share of errors"] = int(truck_car.sum()) / errors
    row[f"truck -> car among the top {top} mistakes"] = len(mistakes)
    row["  their mean p(car)"] = np.mean([x["probability"] for x in mistakes]) if mistakes else float("nan")
    right_cars = (labels == CAR) & (predictions == CAR)
    for name, chosen, target in (("trucks called car (map for car)", truck_car, CAR),
                                 ("trucks right (map for truck)", right_trucks, TRUCK),
                                 ("cars right (map for car)", right_cars, CAR)):
        maps = grad_cam(model, images[chosen], torch.full((int(chosen.sum()),), target), device)
        row[f"{name}: n"] = int(chosen.sum())
        row[f"{name}: CAM mass in centre"], row[f"{name}: CAM mass in lower half"] = mass_shares(maps)
    return row


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--group", nargs="+", action="append", required=True, metavar=("NAME", "CHECKPOINT"),
                        help="a name and its checkpoints (repeat for more groups)")
    parser.add_argument("--data", default=DEV_PATH, help=f"labeled pickle (default: {DEV_PATH})")
    parser.add_argument("--top", type=int, default=24, help="highest-loss mistakes looked at (default: 24)")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    ensure_data(args.data)
    images, labels = load_pickle(args.data)
    device = pick_device(args.device)
    results = {}
    for name, *checkpoints in args.group:
        results[name] = [measure(c, images, labels, args.top, device) for c in checkpoints]
        print(f"measured {name}: {len(checkpoints)} checkpoints", file=sys.stderr)
    names = list(results)
    print(f"{'':<54}" + "".join(f"{name:>24}" for name in names))
    for key in results[names[0]][0]:
        cells = []
        for name in names:
            values = np.array([r[key] for r in results[name]], dtype=float)
            digits = 0 if key.endswith((": n", "mistakes")) or key == "errors" else 3
            cells.append(f"{np.nanmean(values):.{digits}f} ({np.nanmin(values):.{digits}f}-{np.nanmax(values):.{digits}f})")
        print(f"{key:<54}" + "".join(f"{cell:>24}" for cell in cells))


if __name__ == "__main__":
    main()
