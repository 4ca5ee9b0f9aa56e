"""Score automatic label repair against the injected noise recorded in data/manifest.json.

    python bench/label_repair.py                           # both fold models: simple (default) and best
    python bench/label_repair.py --repair-models simple    # one of them
    python bench/label_repair.py --repair-folds 4 --repair-epochs 8 ...   # any trainer.py flags

For each fold model (trainer.py's --repair-model) it runs the trainer's detection step
(k-fold out-of-fold probabilities, cleanlab, the directional-pair filter) on data/train.pickle,
times it, and prints precision and recall of the images it would relabel against the
manifest's list of cats labeled "car". The manifest is read here only: training code never sees it.
"""
import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import trainer  # noqa: E402
from label_repair import find_label_repairs, out_of_fold_probabilities  # noqa: E402
from cli import pick_device, run_main  # noqa: E402
from dataset import CLASSES, MANIFEST_NAME, ensure_data, load_pickle  # noqa: E402


def score(name, chosen, planted):
    chosen = set(chosen)
    hits = len(chosen & planted)
    precision = hits / len(chosen) if chosen else 0.0
    recall = hits / len(planted)
    print(f"  {name:<42} {len(chosen):>7} {hits:>6} {precision:>9.3f} {recall:>7.3f}")
    return {"chosen": len(chosen), "hits": hits, "precision": precision, "recall": recall}


def main():
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--repair-models", nargs="+", choices=sorted(trainer.REPAIR_RECIPES),
                        default=["simple", "best"], help="fold models to score (default: simple best)")
    parser.add_argument("--json", help="also write the results here")
    own, rest = parser.parse_known_args()
    base = trainer.parse_args(rest)
    ensure_data(base.data)
    manifest = json.loads((Path(base.data).parent / MANIFEST_NAME).read_text())
    planted = {entry["index"] for entry in manifest["mislabeled"]}
    images, labels = load_pickle(base.data)
    true = labels.clone()
    true[list(planted)] = CLASSES.index("cat")
    print(f"{base.data}: {len(planted)} planted errors (cats labeled car); training labels correct as given: "
          f"{(labels == true).float().mean():.4f}")
    results = []
    for repair_model in own.repair_models:
        args = trainer.parse_args([*rest, "--repair-model", repair_model])  # its own default epochs
        start = time.time()
        device = pick_device(args.device)
        probs = out_of_fold_probabilities(images, labels, args.repair_folds, args.seed,
                                          trainer.fold_trainer(args, device), device)
        issues, suggested, _, act = find_label_repairs(labels, probs, "directional")
        seconds = time.time() - start
        print(f"--repair-model {repair_model}: {args.repair_folds} folds x {args.repair_epochs} epochs, "
              f"{seconds:.0f}s (out-of-fold probabilities and cleanlab, wall clock)")
        print(f"  {'images chosen by':<42} {'chosen':>7} {'hits':>6} {'precision':>9} {'recall':>7}")
        every = score("cleanlab, every flag (--repair-pairs all)", issues.tolist(), planted)
        directional = score("cleanlab + directional pairs (default)", issues[act].tolist(), planted)
        fixed = labels.clone()
        fixed[issues[act]] = suggested[act]
        correct = (fixed == true).float().mean().item()
        print(f"  training labels correct after repair: {correct:.4f}")
        results.append({"repair_model": repair_model, "folds": args.repair_folds, "epochs": args.repair_epochs,
                        "seed": args.seed, "seconds": round(seconds, 1), "every_flag": every,
                        "directional": directional, "labels_correct_after": correct})
    if own.json:
        Path(own.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    run_main(main)
