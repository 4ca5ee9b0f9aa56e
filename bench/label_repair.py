"""Score automatic label repair against the injected noise recorded in data/manifest.json.

    python bench/label_repair.py [--repair-folds 4 --repair-epochs 8 ...]   # any trainer.py flags

Runs the trainer's detection step (k-fold out-of-fold probabilities, cleanlab, the
directional-pair filter) on data/train.pickle and prints precision and recall of the
images it would relabel, against the manifest's list of cats labeled "car". The manifest
is read here only: training code never sees it.
"""
import json
import sys
import time
from pathlib import Path


sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import trainer  # noqa: E402
from cli import pick_device, run_main  # noqa: E402
from dataset import CLASSES, MANIFEST_NAME, ensure_data, load_pickle  # noqa: E402


def score(name, chosen, planted):
    chosen = set(chosen)
    hits = len(chosen & planted)
    precision = hits / len(chosen) if chosen else 0.0
    print(f"{name:<42} {len(chosen):>7} {hits:>6} {precision:>9.3f} {hits / len(planted):>7.3f}")


def main():
    args = trainer.parse_args()
    ensure_data(args.data)
    manifest = json.loads((Path(args.data).parent / MANIFEST_NAME).read_text())
    planted = {entry["index"] for entry in manifest["mislabeled"]}
    images, labels = load_pickle(args.data)
    start = time.time()
    probs = trainer.out_of_fold_probabilities(images, labels, args, pick_device(args.device))
    seconds = time.time() - start
    print(f"{len(planted)} planted errors; out-of-fold probabilities in {seconds:.0f}s "
          f"({args.repair_folds} folds x {args.repair_epochs} epochs)")
    print(f"{'images chosen by':<42} {'chosen':>7} {'hits':>6} {'precision':>9} {'recall':>7}")
    issues, suggested, _, act = trainer.find_label_repairs(labels, probs, "directional")
    score("cleanlab, every flag (--repair-pairs all)", issues.tolist(), planted)
    score("cleanlab + directional pairs (default)", issues[act].tolist(), planted)
    fixed = labels.clone()
    fixed[issues[act]] = suggested[act]
    true = labels.clone()
    true[list(planted)] = CLASSES.index("cat")
    print(f"training labels correct: {(labels == true).float().mean():.4f} given, "
          f"{(fixed == true).float().mean():.4f} after repair")


if __name__ == "__main__":
    run_main(main)
