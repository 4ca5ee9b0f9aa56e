"""Adversarial examples: how far does a trained model's accuracy fall under FGSM and PGD?

    python adversarialExample.py                          # FGSM on checkpoints/trained.ckpt
    python adversarialExample.py --attack pgd             # PGD as well, both curves in one figure
    python adversarialExample.py --checkpoint checkpoints/robust.ckpt --attack pgd --steps 20 --restarts 5
                                                          # an evaluation gradient masking cannot fool
    python adversarialExample.py --compare checkpoints/trained.ckpt checkpoints/robust.ckpt --attack pgd
    python adversarialExample.py --target cat             # targeted: push non-cats towards "cat"

FGSM (Goodfellow et al., 2015) moves every pixel one step of size epsilon in the
direction that raises the loss: x' = x + eps * sign(grad_x loss). PGD (Madry et al.,
2018) takes several smaller such steps, projecting back onto the eps-ball around x;
with --restarts N it starts from N random points and an image counts as robust only if
every run fails.

Epsilon is on the [0, 1] pixel scale (8/255 is about 0.031; fractions are accepted). The
model sees images normalized to [-1, 1] as (x - 0.5) / 0.5, so there the step is
2 * eps * sign(grad), and every distorted image is clamped to [-1, 1]: it is still a real image.
The attacks themselves are in attacks.py, shared with adversarial training; the figures are
drawn by adversarial_figures.py and the sanity line comes from gradient_masking.py.

Only images the model classifies correctly are attacked. Accuracy is reported as
  attacked set: share of the attacked images still classified correctly (100% at eps 0);
  dev set:      share of all dev images classified correctly under attack (images not
                attacked keep their clean prediction), and its balanced version, the mean
                over the three classes.
An image counts as robust at eps only if the attack failed at eps and at every smaller eps
of the sweep (a smaller perturbation is also a valid larger one), so robust accuracy never
rises with eps. A sanity line says whether the numbers show signs of gradient masking:
PGD no stronger than FGSM, accuracy rising with eps, images surviving a large eps (0.25
or more), or a transfer attack from another model (--transfer-from) beating the white-box one.

Writes to --out (default figures/):
  adversarial/exampleK_<class>_{original,noise,distorted,panel}.png  for --examples images
  adversarial/overview.png       all examples, one row each
  fgsm_accuracy.png              accuracy against epsilon (FGSM, and PGD with --attack pgd)
  adversarial.json               all numbers, including "what did it flip to" counts
  compare_accuracy.png, compare.json   with --compare: a curve per model and attack
"""
import functools
import json
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

from adversarial_figures import plot_accuracy, plot_compare, save_examples
from attacks import (
    EPS_SCALE, attack_direction, attack_predictions, attack_success, eps_text, fgsm_perturb, pgd_perturb,
    transfer_attack,
)
from cli import (
    ArgumentParser, UserError, atomic_write, check_output_dir, float_in, int_in, pick_device, positive_int, run_main,
    seed_type,
)
from dataset import CLASSES, DEV_PATH, load_labeled_data
from gradient_masking import sanity_line
from images import printable_path, warn_skipped
from metrics import balanced_accuracy
from models import load_model, model_mode, predict

DEFAULT_CHECKPOINT = "checkpoints/trained.ckpt"
DEFAULT_EPSILONS = (0.0, 0.01, 0.02, 0.03, 0.05, 0.1, 0.2, 0.3)


# ---------------------------------------------------------------------------
# The ε study: attack every correctly classified image at each ε


def flip_counts(true, pred):
    """{true class: {predicted class: count}} over the attacked images."""
    return {CLASSES[t]: {CLASSES[p]: int(((true == t) & (pred == p)).sum()) for p in range(len(CLASSES))}
            for t in range(len(CLASSES))}


def evaluate(model, attacks, images, labels, epsilons, batch_size, device, target=None, progress=True):
    """Attack every correctly classified (and, targeted, non-target) image at each epsilon.

    attacks: {name: attack(model, x, y, eps, target=None)} or {name: (attack, restarts)}.
    Untargeted, an image counts as robust at ε only if the attack failed at ε and at every
    smaller ε of the sweep (a perturbation inside a smaller ball is inside the larger one),
    so robust accuracy never rises with ε; the per-ε result is kept as *_this_epsilon.
    With several attacks, "worst" is the worst case over all of them.
    Returns (summary, adv_preds); adv_preds[name][eps] holds the attacked images' predicted classes.
    """
    attacks = {name: a if isinstance(a, tuple) else (a, 1) for name, a in attacks.items()}
    clean_pred = predict(model, images, device, batch_size)
    correct = clean_pred == labels
    attacked = correct if target is None else correct & (labels != target)
    if not attacked.any():
        who = "correctly classified" if target is None else f"correctly classified non-{CLASSES[target]}"
        raise UserError(f"no {who} images to attack; is the checkpoint trained?")
    idx = attacked.nonzero().flatten()
    x, y = images[idx], labels[idx]
    summary = {
        "dev_images": len(labels),
        "clean_correct": int(correct.sum()),
        # A ratio of counts, computed as accuracy_dev is, so that eps 0 matches it exactly.
        "clean_accuracy": int(correct.sum()) / len(labels),
        "clean_balanced_accuracy": balanced_accuracy(labels, correct),
        "attacked_images": len(idx),
        "attacked_index": idx.tolist(),
        "results": {},
    }
    epsilons = sorted(epsilons)
    adv_preds = {name: {} for name in attacks}
    broken_at = {}  # (name, eps) -> attacked images broken at eps or at a smaller eps
    jobs = [(name, eps) for name in attacks for eps in epsilons]
    for name, eps in tqdm(jobs, desc="attacking", unit="eps", disable=None if progress else True):
        attack, restarts = attacks[name]
        pred = attack_predictions(model, attack, x, y, eps, batch_size, device, target, restarts)
        adv_preds[name][eps] = pred
        success = attack_success(pred, y, target)
        row = {"epsilon": eps, "accuracy_attacked_this_epsilon": float((pred == y).float().mean())}
        if target is None:
            smaller = [e for e in epsilons if e < eps]
            broken = success | broken_at[(name, smaller[-1])] if smaller else success
            broken_at[(name, eps)] = broken
            row.update(_robust_row(broken, correct, idx, labels))
        else:
            still = pred == y
            robust = correct.clone()
            robust[idx] = still
            row.update({"accuracy_attacked": float(still.float().mean()),
                        "accuracy_dev": int(robust.sum()) / len(labels),
                        "target_success": float(success.float().mean())})
        row["flips"] = flip_counts(y, pred)
        summary["results"].setdefault(name, []).append(row)
    if target is None and len(attacks) > 1:
        summary["results"]["worst"] = [
            {"epsilon": eps, **_robust_row(torch.stack([broken_at[(n, eps)] for n in attacks]).any(0),
                                           correct, idx, labels)}
            for eps in epsilons
        ]
    return summary, adv_preds


def _robust_row(broken, correct, idx, labels):
    robust = correct.clone()
    robust[idx] = ~broken
    return {"accuracy_attacked": float((~broken).float().mean()),
            "accuracy_dev": int(robust.sum()) / len(labels),
            "balanced_dev": balanced_accuracy(labels, robust)}


def print_tables(summary, target=None, titles=None):
    names = list(summary["results"])
    titles = {n: (titles or {}).get(n, n.upper()) for n in names}
    n, k, m = summary["dev_images"], summary["clean_correct"], summary["attacked_images"]
    print(f"Clean: {k}/{n} dev images correct ({k / n:.1%}, balanced {summary['clean_balanced_accuracy']:.1%}); "
          f"attacking {m} of them" + (f" (those whose true class is not {CLASSES[target]})" if target is not None
                                      else ""))
    if target is None:
        print("An image counts as robust at ε only if the attack failed at ε and at every smaller ε of the sweep.")
        print(f"{'ε (pixel)':>9} | {'attack':<22} | {'attacked set':>12} | {'dev set':>7} | {'dev balanced':>12}")
        for i, eps in enumerate(summary["results"][names[0]]):
            for name in names:
                r = summary["results"][name][i]
                print(f"{eps_text(r['epsilon']):>9} | {titles[name]:<22} | {r['accuracy_attacked']:>12.1%} | "
                      f"{r['accuracy_dev']:>7.1%} | {r['balanced_dev']:>12.1%}")
    else:
        print(f"{'ε (pixel)':>9} | {'attack':<22} | {'attacked set':>12} | {'dev set':>7} | "
              f"{'→ ' + CLASSES[target]:>8}")
        for i, _ in enumerate(summary["results"][names[0]]):
            for name in names:
                r = summary["results"][name][i]
                print(f"{eps_text(r['epsilon']):>9} | {titles[name]:<22} | {r['accuracy_attacked']:>12.1%} | "
                      f"{r['accuracy_dev']:>7.1%} | {r['target_success']:>8.1%}")
    pairs = [(t, p) for t in CLASSES for p in CLASSES if t != p]
    heads = [f"{t}→{p}" for t, p in pairs]
    for name in (n for n in names if n != "worst"):
        print(f"\n{titles[name]}: what the attacked images flipped to at each ε (true→predicted counts)")
        print("ε (pixel) | " + " | ".join(heads))
        for r in summary["results"][name]:
            counts = (f"{r['flips'][t][p]:>{len(h)}}" for (t, p), h in zip(pairs, heads))
            print(f"{eps_text(r['epsilon']):>9} | " + " | ".join(counts))


# ---------------------------------------------------------------------------
# Figure 5: original + ε × noise = distorted (the drawing is in adversarial_figures.py)


def choose_examples(true, fooled, count, generator):
    """Indices into the attacked set: random per class, fooled ones first, classes taken in turn."""
    per_class = []
    for cls in range(len(CLASSES)):
        members = (true == cls).nonzero().flatten()
        members = members[torch.randperm(len(members), generator=generator)]
        # Stable sort keeps the random order within "fooled" and within "resisted".
        members = members[torch.sort((~fooled[members]).int(), stable=True).indices]
        per_class.append(members.tolist())
    chosen = []
    while len(chosen) < count and any(per_class):
        for members in per_class:
            if members and len(chosen) < count:
                chosen.append(members.pop(0))
    return chosen


def draw_examples(model, attacks, titles, summary, adv_preds, images, labels, args, device, target, out):
    """Figure 5: --examples images, chosen among those the shown attack fools at --example-epsilon where
    possible, each as original + eps * noise = distorted; returns their JSON records."""
    shown, show_eps = args.attack, args.example_epsilon
    attack = attacks[shown][0]
    attacked_index = torch.tensor(summary["attacked_index"], dtype=torch.long)
    x_att, y_att = images[attacked_index], labels[attacked_index]
    pred = adv_preds[shown].get(show_eps)
    if pred is None:
        pred = attack_predictions(model, attack, x_att, y_att, show_eps, args.batch_size, device, target)
    fooled = attack_success(pred, y_att, target)
    picks = choose_examples(y_att, fooled, args.examples, torch.Generator().manual_seed(args.seed))
    examples = []
    if picks:
        x, y = x_att[picks].to(device), y_att[picks].to(device)
        distorted = attack(model, x, y, show_eps, target=target)
        if shown == "fgsm":
            with model_mode(model, training=False):
                noise = attack_direction(model, x, y, target)
        else:  # PGD's noise is what it added, rescaled to [-1, 1]; the ε-ball bounds it
            noise = (distorted - x) / (EPS_SCALE * show_eps) if show_eps > 0 else torch.zeros_like(x)
        probs = [predict(model, z, device, len(z), probabilities=True) for z in (x, noise, distorted)]
        for k, i in enumerate(picks):
            examples.append({
                "dev_index": int(attacked_index[i]), "true": CLASSES[int(y_att[i])],
                "original": x[k].cpu(), "noise": noise[k].cpu(), "distorted": distorted[k].cpu(),
                "probs": [p[k] for p in probs],
            })
    label = titles[shown]
    if target is not None:
        label += f" → {CLASSES[target]}"
    return save_examples(out / "adversarial", examples, show_eps, label, target)


# ---------------------------------------------------------------------------
# Several models compared (the gradient-masking checks are in gradient_masking.py)


def print_compare(summaries, titles):
    names = [n for n in next(iter(summaries.values()))["results"]]
    print("Balanced dev accuracy under attack (worst case over ε' ≤ ε; ε = 0 is the clean model)")
    header = f"{'ε (pixel)':>9}"
    columns = [(m, n) for m in summaries for n in names]
    heads = [f"{m}: {titles.get(n, n)}" for m, n in columns]
    print(header + "".join(f" | {h}" for h in heads))
    rows = len(summaries[columns[0][0]]["results"][names[0]])
    for i in range(rows):
        eps = summaries[columns[0][0]]["results"][names[0]][i]["epsilon"]
        cells = (f"{summaries[m]['results'][n][i]['balanced_dev']:>{len(h)}.1%}" for (m, n), h in zip(columns, heads))
        print(f"{eps_text(eps):>9}" + "".join(f" | {c}" for c in cells))


def compare(args, device, images, labels, out):
    attacks, titles = make_attacks(args, device)
    summaries = {}
    for path in args.compare:
        model = load_checkpoint_arg(path, device)
        summary, _ = evaluate(model, attacks, images, labels, sorted(set(args.epsilons)), args.batch_size, device)
        summary.pop("attacked_index")
        name = Path(path).stem
        if name in summaries:
            name = str(path)
        summaries[name] = summary
        print(f"{name}: clean balanced {summary['clean_balanced_accuracy']:.1%}; {sanity_line(summary, titles)}")
    print()
    print_compare(summaries, titles)
    plot_compare(summaries, out / "compare_accuracy.png", titles)
    report = {"checkpoints": list(args.compare), "data": str(args.data), "titles": titles,
              "definitions": report_definitions(None), "seed": args.seed,
              "sanity": {name: sanity_line(s, titles) for name, s in summaries.items()}, "models": summaries}
    atomic_write(out / "compare.json", lambda f: f.write((json.dumps(report, indent=1) + "\n").encode()))
    print(f"\nSaved {out / 'compare_accuracy.png'} and {out / 'compare.json'}")


# ---------------------------------------------------------------------------
# Command line


def parse_args(argv=None):
    parser = ArgumentParser(description=__doc__)
    eps_type = float_in(0, 1)
    parser.add_argument("--checkpoint", default=DEFAULT_CHECKPOINT,
                        help=f"model to attack (default: {DEFAULT_CHECKPOINT}, written by trainer.py)")
    parser.add_argument("--compare", nargs="+", metavar="CKPT",
                        help="instead of one model, attack each of these and draw one comparison figure "
                             "(compare_accuracy.png) with a curve per model and attack")
    parser.add_argument("--data", default=DEV_PATH,
                        help="images to attack: a course data pickle, or a folder with class subfolders car/ (or "
                             f"automobile/), truck/ and cat/ holding image files (default: {DEV_PATH})")
    parser.add_argument("--skip-bad", action="store_true",
                        help="with an image folder: skip files that cannot be read (a warning line each) instead "
                             "of stopping at the first")
    parser.add_argument("--cifar-dir", help="local CIFAR-10 copy, used if the default data must be built")
    parser.add_argument("--out", default="figures", help="output folder (default: figures)")
    parser.add_argument("--epsilons", type=eps_type, nargs="+", default=list(DEFAULT_EPSILONS), metavar="EPS",
                        help="attack strengths on the [0, 1] pixel scale, each in [0, 1], fractions allowed "
                             f"(8/255) (default: {' '.join(f'{e:g}' for e in DEFAULT_EPSILONS)}); the model's "
                             "[-1, 1] inputs move by 2*EPS")
    parser.add_argument("--attack", choices=("fgsm", "pgd"), default="fgsm",
                        help="fgsm: one signed-gradient step; pgd: iterated FGSM, evaluated next to FGSM "
                             "(default: fgsm)")
    parser.add_argument("--steps", type=int_in(1, 10_000), default=10, help="PGD steps (default: 10)")
    parser.add_argument("--step-size", type=float_in(0, 1, low_open=True),
                        help="PGD step on the [0, 1] pixel scale (default: epsilon / 4)")
    parser.add_argument("--random-start", action="store_true", help="PGD starts at a random point of the ε-ball")
    parser.add_argument("--restarts", type=int_in(1, 1000), default=1,
                        help="PGD runs per image from random starts; an image counts as robust only if every "
                             "run fails (implies --random-start when above 1) (default: 1)")
    parser.add_argument("--transfer-from", metavar="CKPT",
                        help="also attack with adversarial images crafted on this model (black-box transfer, "
                             "e.g. a standard model against an adversarially trained one): a gradient-masking check")
    parser.add_argument("--target", choices=CLASSES,
                        help="targeted attack: push images of the other classes toward this class")
    parser.add_argument("--examples", type=int_in(0, 1000), default=6,
                        help="example images to draw, spread over the classes (default: 6)")
    parser.add_argument("--example-epsilon", type=eps_type, default=0.03,
                        help="ε of the drawn examples, pixel scale (default: 0.03, about 8/255)")
    parser.add_argument("--seed", type=seed_type, default=0,
                        help="seed for example choice and PGD starts, 0 to 2**32-1 (default: 0)")
    parser.add_argument("--batch-size", type=positive_int, default=250, help="images per attack batch (default: 250)")
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:N, mps or auto: CUDA, else MPS, else the CPU (default: auto)")
    args = parser.parse_args(argv)
    if args.target is not None and (args.compare or args.transfer_from):
        parser.error("--target cannot be combined with --compare or --transfer-from")
    return args


def load_checkpoint_arg(path, device):
    if not Path(path).exists():
        raise UserError(f"{path}: no such checkpoint; train one with `python trainer.py` or pass --checkpoint PATH")
    return load_model(path).to(device).eval()


def make_attacks(args, device):
    """{name: (attack, restarts)} and their display titles, from the flags."""
    random_start = args.random_start or args.restarts > 1
    pgd = functools.partial(pgd_perturb, steps=args.steps, step_size=args.step_size, random_start=random_start,
                            generator=torch.Generator().manual_seed(args.seed))
    attacks = {"fgsm": (fgsm_perturb, 1)}
    titles = {"fgsm": "FGSM", "worst": "worst case"}
    if args.attack == "pgd":
        attacks["pgd"] = (pgd, args.restarts)
        titles["pgd"] = f"PGD-{args.steps}" + (f" ×{args.restarts} restarts" if args.restarts > 1 else "")
    if args.transfer_from:
        source = load_checkpoint_arg(args.transfer_from, device)
        attacks["transfer"] = (transfer_attack(source, pgd if args.attack == "pgd" else fgsm_perturb), 1)
        titles["transfer"] = f"transfer from {Path(args.transfer_from).stem}"
    return attacks, titles


def report_definitions(target):
    return {
        "epsilon_scale": "epsilon on the [0, 1] pixel scale; 2*epsilon in the normalized [-1, 1] space",
        "accuracy_attacked": "share of the attacked images (correctly classified"
                             + (", true class != target" if target is not None else "")
                             + ") still classified correctly"
                             + ("" if target is not None else "; worst case over every epsilon <= this one"),
        "accuracy_attacked_this_epsilon": "the same, from the attack at this epsilon alone",
        "accuracy_dev": "share of all dev images classified correctly under attack; images not attacked keep "
                        "their clean prediction",
        "balanced_dev": "accuracy_dev per class, averaged over the classes",
        "target_success": "share of the attacked images classified as the target class",
        "worst": "an image is broken if any attack broke it",
        "flips": "attacked images: {true class: {predicted class: count}}",
    }


def main():
    args = parse_args()
    device = pick_device(args.device)
    out = check_output_dir(args.out, "--out", create=False)  # made when written: a refused run leaves none
    if args.compare:
        for path in args.compare:
            load_checkpoint_arg(path, device)  # every file checked before minutes of attacks
    else:
        model = load_checkpoint_arg(args.checkpoint, device)
    images, labels, files, skipped = load_labeled_data(args.data, args.cifar_dir, args.skip_bad)
    if args.compare:
        compare(args, device, images, labels, out)
        warn_skipped(skipped, len(labels))
        return
    target = None if args.target is None else CLASSES.index(args.target)
    attacks, titles = make_attacks(args, device)
    epsilons = sorted(set(args.epsilons))
    started = time.perf_counter()
    summary, adv_preds = evaluate(model, attacks, images, labels, epsilons, args.batch_size, device, target)
    seconds = time.perf_counter() - started
    print_tables(summary, target, titles)
    print(f"\n{len(epsilons)} epsilons × {', '.join(titles[a] for a in attacks)} on "
          f"{summary['attacked_images']} images took {seconds:.1f} s on {device}")
    sanity = sanity_line(summary, titles) if target is None else None
    if sanity:
        print(sanity)

    plot_accuracy(summary, out / "fgsm_accuracy.png", target, titles)

    records = draw_examples(model, attacks, titles, summary, adv_preds, images, labels, args, device, target, out)
    if files is not None:  # an image folder: name the photo behind each example
        for record in records:
            record["file"] = printable_path(files[record["dev_index"]])

    report = {
        "checkpoint": str(args.checkpoint),
        "data": str(args.data),
        **({"skipped": skipped} if files is not None else {}),
        "device": str(device),
        "definitions": report_definitions(target),
        "attack": args.attack,
        "titles": titles,
        "target": args.target,
        "pgd": {"steps": args.steps, "step_size": args.step_size or "epsilon/4",
                "random_start": args.random_start or args.restarts > 1,
                "restarts": args.restarts} if args.attack == "pgd" else None,
        "transfer_from": args.transfer_from,
        "seed": args.seed,
        "seconds": round(seconds, 2),
        "sanity": sanity,
        **{k: v for k, v in summary.items() if k != "attacked_index"},
        "example_epsilon": args.example_epsilon,
        "examples": records,
        "figures": {"accuracy": str(out / "fgsm_accuracy.png"),
                    "overview": str(out / "adversarial" / "overview.png") if records else None},
    }
    json_path = out / "adversarial.json"
    atomic_write(json_path, lambda f: f.write((json.dumps(report, indent=1) + "\n").encode()))
    print(f"Saved {out / 'fgsm_accuracy.png'}, {len(records)} examples in {out / 'adversarial'}/ and {json_path}")
    sys.stdout.flush()
    warn_skipped(skipped, len(labels))


if __name__ == "__main__":
    run_main(main)
