"""Score automatic label repair against the noise the data build planted (manifest.json), per seed and per pair.

    python bench/label_repair.py                                   # data seeds 0 1 2 x fold seeds 0 1 2
    python bench/label_repair.py --data-seeds 0 --seeds 0          # one run
    python bench/label_repair.py --repair-model best               # the strong fold models
    python bench/label_repair.py --repair-epochs 12 ...            # any trainer.py flag

Data seed 0 is the default data (data/); seeds 1 and 2 are built into data/seed<N>/ (another
draw of the same sizes and noise: `python dataset.py build --seed N`). For every (data seed,
fold-model seed) it runs the trainer's repair step on the training set (k-fold out-of-fold
probabilities, then the decision rule of label_repair.py), times it, and scores what it would
relabel against the manifest's true labels: per (given -> suggested) pair the relabels, how
many are right and how many wrong, and over all the precision and recall (the share of the
planted errors put right). The manifest is read here only: training code never sees it.
"""
import argparse
import json
import sys
import time
from pathlib import Path


ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import trainer  # noqa: E402
from cli import pick_device, run_main  # noqa: E402
from dataset import CLASSES, MANIFEST_NAME, TRAIN_PATH, build_from_cifar, cifar_source, ensure_data, load_pickle  # noqa: E402
from label_repair import find_label_repairs, out_of_fold_probabilities  # noqa: E402


def data_for(seed, cifar_dir):
    """(train.pickle, manifest) of data seed `seed`: the default data for 0, data/seed<N>/ otherwise (built once)."""
    if seed == 0:
        ensure_data(TRAIN_PATH, cifar_dir=cifar_dir)
        folder = Path(TRAIN_PATH).parent
    else:
        folder = Path(TRAIN_PATH).parent / f"seed{seed}"
        if not (folder / "train.pickle").is_file():
            build_from_cifar(cifar_source(cifar_dir), folder, seed=seed)
    return folder / "train.pickle", json.loads((folder / MANIFEST_NAME).read_text())


def true_labels(given, manifest):
    true = given.clone()
    for entry in manifest["mislabeled"]:
        true[entry["index"]] = CLASSES.index(entry["true"])
    return true


def score(given, true, issues, suggested, act):
    """Per (given -> suggested) pair and over all: relabels acted on, right and wrong; precision and recall."""
    pairs = {}
    for i, s in zip(issues[act].tolist(), suggested[act].tolist()):
        pair = pairs.setdefault(f"{CLASSES[given[i]]}->{CLASSES[s]}", {"relabeled": 0, "right": 0, "wrong": 0})
        pair["relabeled"] += 1
        pair["right" if true[i] == s else "wrong"] += 1
    right = sum(p["right"] for p in pairs.values())
    acted = sum(p["relabeled"] for p in pairs.values())
    planted = int((given != true).sum())
    return {"pairs": pairs, "relabeled": acted, "right": right,
            "precision": right / acted if acted else 0.0, "recall": right / planted if planted else 0.0,
            "labels_correct_after": None}


def main():
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--data-seeds", type=int, nargs="+", default=[0, 1, 2], help="data builds to score")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="fold-model seeds (--seed)")
    parser.add_argument("--json", help="also write every run here")
    own, rest = parser.parse_known_args()
    runs = []
    for data_seed in own.data_seeds:
        base = trainer.parse_args(rest)
        train_path, manifest = data_for(data_seed, base.cifar_dir)
        images, given = load_pickle(train_path)
        true = true_labels(given, manifest)
        for seed in own.seeds:
            args = trainer.parse_args([*rest, "--seed", str(seed), "--data", str(train_path)])
            device = pick_device(args.device)
            start = time.time()
            probs = out_of_fold_probabilities(images, given, args.repair_folds, args.seed,
                                              trainer.fold_trainer(args, device), device)
            issues, suggested, _, act, _ = find_label_repairs(given, probs, args.repair_pairs)
            seconds = time.time() - start
            result = score(given, true, issues, suggested, act)
            fixed = given.clone()
            fixed[issues[act]] = suggested[act]
            result.update(data_seed=data_seed, seed=seed, seconds=round(seconds, 1),
                          labels_correct_after=float((fixed == true).float().mean()),
                          labels_correct_before=float((given == true).float().mean()))
            runs.append(result)
            pairs = ", ".join(f"{name} {p['relabeled']} ({p['wrong']} wrong)" for name, p in sorted(result["pairs"].items()))
            print(f"data seed {data_seed}, fold seed {seed}: precision {result['precision']:.3f}, recall "
                  f"{result['recall']:.3f}, labels correct {result['labels_correct_before']:.4f} -> "
                  f"{result['labels_correct_after']:.4f}, {seconds:.0f}s; {pairs or 'nothing relabeled'}", flush=True)
    if runs:
        worst_wrong = max((p["wrong"] for r in runs for p in r["pairs"].values()), default=0)
        print(f"over {len(runs)} runs: precision {min(r['precision'] for r in runs):.3f}-"
              f"{max(r['precision'] for r in runs):.3f}, recall {min(r['recall'] for r in runs):.3f}-"
              f"{max(r['recall'] for r in runs):.3f}, most wrong relabels in one pair {worst_wrong}, "
              f"{min(r['seconds'] for r in runs):.0f}-{max(r['seconds'] for r in runs):.0f}s a run")
    if own.json:
        Path(own.json).write_text(json.dumps(runs, indent=1))


if __name__ == "__main__":
    run_main(main)
