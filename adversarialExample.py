"""Adversarial examples: how far does a trained model's accuracy fall under FGSM and PGD?

    python adversarialExample.py                          # FGSM on checkpoints/trained.ckpt
    python adversarialExample.py --attack pgd             # PGD as well, both curves in one figure
    python adversarialExample.py --target cat             # targeted: push non-cats towards "cat"

FGSM (Goodfellow et al., 2015) moves every pixel one step of size epsilon in the
direction that raises the loss: x' = x + eps * sign(grad_x loss). PGD (Madry et al.,
2018) takes several smaller such steps, projecting back onto the eps-ball around x.

Epsilon is on the [0, 1] pixel scale (0.03 is about 8/255). The model sees images
normalized to [-1, 1] as (x - 0.5) / 0.5, so there the step is 2 * eps * sign(grad), and
every distorted image is clamped to [-1, 1]: it is still a real image.

Only images the model classifies correctly are attacked. Accuracy is reported two ways:
  attacked set: share of the attacked images still classified correctly (100% at eps 0);
  dev set:      share of all dev images classified correctly after the attack; images
                not attacked keep their clean prediction, so at eps 0 this is the clean
                accuracy.

Writes to --out (default figures/):
  adversarial/exampleK_<class>_{original,noise,distorted,panel}.png  for --examples images
  adversarial/overview.png       all examples, one row each
  fgsm_accuracy.png              accuracy against epsilon (FGSM, and PGD with --attack pgd)
  adversarial.json               all numbers, including "what did it flip to" counts
"""
import contextlib
import functools
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from cli import (
    ArgumentParser, UserError, atomic_write, check_output_dir, float_in, int_in, pick_device,
    positive_int, run_main, seed_type,
)
from dataset import (
    CLASSES, DEV_PATH, from_unit, load_labeled_data, printable_path, pyplot, save_figure, to_unit, warn_skipped,
)
from models import load_model, predict_proba

DEFAULT_CHECKPOINT = "checkpoints/trained.ckpt"
DEFAULT_EPSILONS = (0.0, 0.01, 0.02, 0.03, 0.05, 0.1, 0.2, 0.3)
# How far one pixel-scale unit reaches in the model's normalized space (2.0 for (x - 0.5) / 0.5):
# taken from dataset.from_unit so the two can never disagree.
EPS_SCALE = float(from_unit(torch.tensor(1.0)) - from_unit(torch.tensor(0.0)))


# ---------------------------------------------------------------------------
# Attacks (batched: one forward/backward pass per batch and step)


@contextlib.contextmanager
def eval_mode(model):
    """Dropout off while attacking; the caller's train/eval mode is restored afterwards."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


def _fast_layout(images):
    # On CPU, oneDNN runs these convolutions (above all the input gradient of the 3-channel
    # first layer) 20-40% faster on channels-last batches; values are unchanged.
    if images.device.type == "cpu" and images.dim() == 4:
        return images.detach().contiguous(memory_format=torch.channels_last)
    return images.detach()


def _label_tensor(labels, like):
    if isinstance(labels, torch.Tensor):
        return labels.to(like.device)
    return torch.full((len(like),), int(labels), dtype=torch.long, device=like.device)


def input_gradient(model, images, labels):
    """d loss / d images for a whole batch, without touching the parameters' .grad."""
    with torch.enable_grad():
        x = images.detach().requires_grad_(True)
        # Summed, not averaged: each image's gradient is then independent of the batch size
        # (a mean would shrink it by 1/N and could underflow to 0, and sign(0) = 0).
        loss = F.cross_entropy(model(x), _label_tensor(labels, x), reduction="sum")
        (grad,) = torch.autograd.grad(loss, x)
    return grad


def attack_direction(model, images, labels, target=None):
    """The FGSM noise: sign of the loss gradient, or its opposite toward a target class."""
    if target is None:
        return input_gradient(model, images, labels).sign()
    # Targeted: walk *down* the loss of the target label rather than up the loss of the true one.
    return -input_gradient(model, images, target).sign()


def fgsm_perturb(model, images, labels, epsilon, target=None):
    """FGSM on normalized images [N, 3, 32, 32]: clamp(x + 2*eps*sign(grad), -1, 1).

    epsilon is on the [0, 1] pixel scale; target (class id or [N] tensor) makes it targeted,
    in which case labels are not used.
    """
    images = _fast_layout(images)
    with eval_mode(model):
        direction = attack_direction(model, images, labels, target)
    return (images + EPS_SCALE * epsilon * direction).clamp(-1, 1)


def pgd_perturb(model, images, labels, epsilon, steps=10, step_size=None, random_start=False, target=None,
                generator=None):
    """PGD: `steps` FGSM steps of step_size (default eps/4, pixel scale), each projected back
    onto the eps-ball around the images and into [-1, 1]. random_start begins at a uniform
    random point of the ball (seeded by generator, a CPU torch.Generator)."""
    images = _fast_layout(images)
    radius = EPS_SCALE * epsilon
    step = EPS_SCALE * (epsilon / 4 if step_size is None else step_size)
    low, high = images - radius, images + radius
    adv = images.clone()
    if radius == 0:  # the eps-ball is a point: nothing to search
        return adv
    if random_start:
        noise = torch.rand(images.shape, generator=generator, dtype=images.dtype).to(images.device)
        adv = (adv + (2 * noise - 1) * radius).clamp(-1, 1)
    with eval_mode(model):
        for _ in range(steps):
            adv = adv + step * attack_direction(model, adv, labels, target)
            adv = torch.clamp(adv, low, high).clamp(-1, 1)
    return adv


@torch.no_grad()
def _classify(model, images):
    return model(images).softmax(1)


def attack_predictions(model, attack, images, labels, epsilon, batch_size, device, target=None):
    """Predicted classes [N] (CPU) of the attacked images, attacked batch by batch on device."""
    preds = []
    with eval_mode(model):
        for start in range(0, len(images), batch_size):
            x = images[start : start + batch_size].to(device)
            y = labels[start : start + batch_size].to(device)
            adv = attack(model, x, y, epsilon, target=target)
            preds.append(_classify(model, adv).argmax(1).cpu())
    return torch.cat(preds)


# ---------------------------------------------------------------------------
# Evaluation


def flip_counts(true, pred):
    """{true class: {predicted class: count}} over the attacked images."""
    return {CLASSES[t]: {CLASSES[p]: int(((true == t) & (pred == p)).sum()) for p in range(len(CLASSES))}
            for t in range(len(CLASSES))}


def evaluate(model, attacks, images, labels, epsilons, batch_size, device, target=None, progress=True):
    """Attack every correctly classified (and, targeted, non-target) image at each epsilon.

    attacks: {name: attack(model, x, y, eps, target=None)}. Returns (summary, adv_preds)
    where adv_preds[name][eps] holds the attacked images' predicted classes.
    """
    clean_pred = predict_proba(model, images, device, batch_size).argmax(1)
    correct = clean_pred == labels
    attacked = correct if target is None else correct & (labels != target)
    if not attacked.any():
        who = "correctly classified" if target is None else f"correctly classified non-{CLASSES[target]}"
        raise UserError(f"no {who} images to attack; is the checkpoint trained?")
    idx = attacked.nonzero().flatten()
    x, y = images[idx], labels[idx]
    untouched_correct = int((correct & ~attacked).sum())
    summary = {
        "dev_images": len(labels),
        "clean_correct": int(correct.sum()),
        # A ratio of counts, computed as accuracy_dev is, so that eps 0 matches it exactly.
        "clean_accuracy": int(correct.sum()) / len(labels),
        "attacked_images": len(idx),
        "attacked_index": idx.tolist(),
        "results": {},
    }
    adv_preds = {name: {} for name in attacks}
    jobs = [(name, eps) for eps in epsilons for name in attacks]
    for name, eps in tqdm(jobs, desc="attacking", unit="eps", disable=None if progress else True):
        pred = attack_predictions(model, attacks[name], x, y, eps, batch_size, device, target)
        adv_preds[name][eps] = pred
        still = int((pred == y).sum())
        row = {
            "epsilon": eps,
            "accuracy_attacked": still / len(y),
            "accuracy_dev": (untouched_correct + still) / len(labels),
            "flips": flip_counts(y, pred),
        }
        if target is not None:
            row["target_success"] = int((pred == target).sum()) / len(y)
        summary["results"].setdefault(name, []).append(row)
    return summary, adv_preds


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


# ---------------------------------------------------------------------------
# Figures



def _save_png(path, array, **kwargs):
    plt = pyplot()
    atomic_write(path, lambda f: plt.imsave(f, array, format="png", **kwargs))


def _rgb(image):
    return to_unit(image).clamp(0, 1).permute(1, 2, 0).cpu().numpy()


def _grey(noise):
    # The noise has a sign per colour channel; their mean shows where all three agree.
    return noise.mean(0).cpu().numpy()


def _caption(probs):
    p, c = probs.max(0)
    return f"{CLASSES[int(c)]} {float(p):.0%}"


def draw_panel(ax_row, original, noise, distorted, probs, true_name, attack_label, target=None):
    """Original + eps * Noise = Distorted on three axes, each titled with prediction and confidence.

    Returns whether the attack succeeded: misclassified, or (targeted) classified as target."""
    (p_orig, p_noise, p_adv) = probs
    pred = int(p_adv.argmax())
    fooled = pred != CLASSES.index(true_name) if target is None else pred == target
    panels = [
        (_rgb(original), {}, f"original ({true_name})\n{_caption(p_orig)}", "black"),
        (_grey(noise), dict(cmap="gray", vmin=-1, vmax=1), f"noise ({attack_label})\n{_caption(p_noise)}",
         "dimgray"),
        (_rgb(distorted), {}, f"distorted\n{_caption(p_adv)}", "red" if fooled else "green"),
    ]
    for ax, (img, kw, title, colour) in zip(ax_row, panels):
        ax.imshow(img, interpolation="nearest", **kw)
        ax.set_title(title, fontsize=9, color=colour)
        ax.set_xticks([])
        ax.set_yticks([])
    return fooled


def save_examples(out_dir, examples, epsilon, attack_label, target=None):
    """Per example: the three images as 32x32 PNGs and one annotated panel; plus an overview."""
    plt = pyplot()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    # A previous run may have drawn more examples; its leftovers would pass for this run's.
    for stale in [*out_dir.glob("example*_*.png"), out_dir / "overview.png"]:
        stale.unlink(missing_ok=True)
    records = []
    for k, ex in enumerate(examples):
        stem = out_dir / f"example{k}_{ex['true']}"
        files = {part: f"{stem}_{part}.png" for part in ("original", "noise", "distorted", "panel")}
        _save_png(files["original"], _rgb(ex["original"]))
        _save_png(files["noise"], _grey(ex["noise"]), cmap="gray", vmin=-1, vmax=1)
        _save_png(files["distorted"], _rgb(ex["distorted"]))

        # Operators get axes of their own between the images, so the panel reads as an equation.
        fig, axes = plt.subplots(1, 5, figsize=(7.6, 2.9), gridspec_kw={"width_ratios": [1, 0.42, 1, 0.22, 1]})
        fooled = draw_panel(axes[::2], ex["original"], ex["noise"], ex["distorted"], ex["probs"], ex["true"],
                            attack_label, target)
        outcome = ("fooled" if fooled else "resisted") if target is None else \
            (f"now {CLASSES[target]}" if fooled else f"not {CLASSES[target]}")
        for ax, text in ((axes[1], f"+ {epsilon:g} ×"), (axes[3], "=")):
            ax.axis("off")
            ax.text(0.5, 0.5, text, ha="center", va="center", fontsize=13, transform=ax.transAxes)
        fig.suptitle(f"{attack_label}, ε = {epsilon:g} (pixel scale): {outcome}",
                     fontsize=10)
        fig.subplots_adjust(left=0.02, right=0.98, bottom=0.04, top=0.75, wspace=0.05)
        save_figure(fig, files["panel"])
        records.append({
            "dev_index": ex["dev_index"], "true": ex["true"], "attack_succeeded": fooled,
            "clean": _caption(ex["probs"][0]), "noise": _caption(ex["probs"][1]),
            "distorted": _caption(ex["probs"][2]), "files": files,
        })
    if examples:
        fig, axes = plt.subplots(len(examples), 3, figsize=(5.4, 2.1 * len(examples)), squeeze=False)
        for row, ex in zip(axes, examples):
            draw_panel(row, ex["original"], ex["noise"], ex["distorted"], ex["probs"], ex["true"], attack_label,
                       target)
        fig.suptitle(f"original + {epsilon:g} × noise = distorted ({attack_label})", fontsize=10)
        fig.tight_layout()
        save_figure(fig, out_dir / "overview.png")
    return records


def plot_accuracy(summary, path, target=None, titles=None):
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    styles = {"fgsm": "tab:blue", "pgd": "tab:red"}
    for name, rows in summary["results"].items():
        eps = [r["epsilon"] for r in rows]
        label = (titles or {}).get(name, name.upper())
        ax.plot(eps, [100 * r["accuracy_attacked"] for r in rows], "o-", color=styles.get(name),
                label=f"{label}: attacked set")
        ax.plot(eps, [100 * r["accuracy_dev"] for r in rows], "s--", color=styles.get(name), alpha=0.6,
                label=f"{label}: whole dev set")
        if target is not None:
            ax.plot(eps, [100 * r["target_success"] for r in rows], "^:", color=styles.get(name),
                    label=f"{label}: classified as {CLASSES[target]}")
    ax.set_xlabel("ε ([0, 1] pixel scale)")
    ax.set_ylabel("%")
    kind = f"targeted → {CLASSES[target]}" if target is not None else "untargeted"
    ax.set_title(f"Accuracy under attack ({kind}); clean dev accuracy {summary['clean_accuracy']:.1%}", fontsize=10)
    ax.set_ylim(-2, 102)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, path)


# ---------------------------------------------------------------------------
# Reporting


def print_tables(summary, target=None, titles=None):
    names = list(summary["results"])
    titles = {n: (titles or {}).get(n, n.upper()) for n in names}
    n, k, m = summary["dev_images"], summary["clean_correct"], summary["attacked_images"]
    print(f"Clean: {k}/{n} dev images correct ({k / n:.1%}); attacking {m} of them"
          + (f" (those whose true class is not {CLASSES[target]})" if target is not None else ""))
    header = "ε (pixel)"
    for name in names:
        header += f" | {titles[name]} acc. attacked set | {titles[name]} acc. dev set"
        if target is not None:
            header += f" | {titles[name]} → {CLASSES[target]}"
    print(header)
    rows = zip(*(summary["results"][name] for name in names))
    for row in rows:
        line = f"{row[0]['epsilon']:>9g}"
        for name, r in zip(names, row):
            w = len(f" | {titles[name]} acc. attacked set") - 3
            line += f" | {r['accuracy_attacked']:>{w}.1%} | {r['accuracy_dev']:>{w - 3}.1%}"
            if target is not None:
                line += f" | {r['target_success']:>{len(titles[name]) + 3 + len(CLASSES[target])}.1%}"
        print(line)
    pairs = [(t, p) for t in CLASSES for p in CLASSES if t != p]
    heads = [f"{t}→{p}" for t, p in pairs]
    for name in names:
        print(f"\n{titles[name]}: what the attacked images flipped to (true→predicted counts)")
        print("ε (pixel) | " + " | ".join(heads))
        for r in summary["results"][name]:
            counts = (f"{r['flips'][t][p]:>{len(h)}}" for (t, p), h in zip(pairs, heads))
            print(f"{r['epsilon']:>9g} | " + " | ".join(counts))


# ---------------------------------------------------------------------------
# Command line


def parse_args(argv=None):
    parser = ArgumentParser(description=__doc__)
    eps_type = float_in(0, 1)
    parser.add_argument("--checkpoint", default=DEFAULT_CHECKPOINT,
                        help=f"model to attack (default: {DEFAULT_CHECKPOINT}, written by trainer.py)")
    parser.add_argument("--data", default=DEV_PATH,
                        help="images to attack: a course data pickle, or a folder with class subfolders car/ (or "
                             f"automobile/), truck/ and cat/ holding image files (default: {DEV_PATH})")
    parser.add_argument("--skip-bad", action="store_true",
                        help="with an image folder: skip files that cannot be read (a warning line each) instead "
                             "of stopping at the first")
    parser.add_argument("--cifar-dir", help="local CIFAR-10 copy, used if the default data must be built")
    parser.add_argument("--out", default="figures", help="output folder (default: figures)")
    parser.add_argument("--epsilons", type=eps_type, nargs="+", default=list(DEFAULT_EPSILONS), metavar="EPS",
                        help="attack strengths on the [0, 1] pixel scale, each in [0, 1] (default: "
                             f"{' '.join(f'{e:g}' for e in DEFAULT_EPSILONS)}); the model's [-1, 1] inputs move "
                             "by 2*EPS")
    parser.add_argument("--attack", choices=("fgsm", "pgd"), default="fgsm",
                        help="fgsm: one signed-gradient step; pgd: iterated FGSM, evaluated next to FGSM "
                             "(default: fgsm)")
    parser.add_argument("--steps", type=int_in(1, 10_000), default=10, help="PGD steps (default: 10)")
    parser.add_argument("--step-size", type=float_in(0, 1, low_open=True),
                        help="PGD step on the [0, 1] pixel scale (default: epsilon / 4)")
    parser.add_argument("--random-start", action="store_true", help="PGD starts at a random point of the ε-ball")
    parser.add_argument("--target", choices=CLASSES,
                        help="targeted attack: push images of the other classes toward this class")
    parser.add_argument("--examples", type=int_in(0, 1000), default=6,
                        help="example images to draw, spread over the classes (default: 6)")
    parser.add_argument("--example-epsilon", type=eps_type, default=0.03,
                        help="ε of the drawn examples, pixel scale (default: 0.03, about 8/255)")
    parser.add_argument("--seed", type=seed_type, default=0,
                        help="seed for example choice and PGD starts, 0 to 2**32-1 (default: 0)")
    parser.add_argument("--batch-size", type=positive_int, default=250, help="images per attack batch (default: 250)")
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default: auto)")
    return parser.parse_args(argv)


def main():
    args = parse_args()
    device = pick_device(args.device)
    out = check_output_dir(args.out, "--out")
    if not Path(args.checkpoint).exists():
        raise UserError(f"{args.checkpoint}: no such checkpoint; train one with `python trainer.py` "
                        "or pass --checkpoint PATH")
    model = load_model(args.checkpoint).to(device).eval()
    images, labels, files, skipped = load_labeled_data(args.data, args.cifar_dir, args.skip_bad)
    target = None if args.target is None else CLASSES.index(args.target)

    pgd = functools.partial(pgd_perturb, steps=args.steps, step_size=args.step_size,
                            random_start=args.random_start, generator=torch.Generator().manual_seed(args.seed))
    attacks = {"fgsm": fgsm_perturb}
    if args.attack == "pgd":
        attacks["pgd"] = pgd
    titles = {"fgsm": "FGSM", "pgd": f"PGD-{args.steps}"}
    epsilons = sorted(set(args.epsilons))
    started = time.perf_counter()
    summary, adv_preds = evaluate(model, attacks, images, labels, epsilons, args.batch_size, device, target)
    seconds = time.perf_counter() - started
    print_tables(summary, target, titles)
    print(f"\n{len(epsilons)} epsilons × {', '.join(titles[a] for a in attacks)} on "
          f"{summary['attacked_images']} images took {seconds:.1f} s on {device}")

    plot_accuracy(summary, out / "fgsm_accuracy.png", target, titles)

    # Examples: chosen among images the shown attack fools at --example-epsilon where possible.
    shown, show_eps = args.attack, args.example_epsilon
    attacked_index = torch.tensor(summary["attacked_index"], dtype=torch.long)
    x_att, y_att = images[attacked_index], labels[attacked_index]
    pred = adv_preds[shown].get(show_eps)
    if pred is None:
        pred = attack_predictions(model, attacks[shown], x_att, y_att, show_eps, args.batch_size, device, target)
    fooled = pred != y_att if target is None else pred == target
    picks = choose_examples(y_att, fooled, args.examples, torch.Generator().manual_seed(args.seed))
    examples = []
    if picks:
        x, y = x_att[picks].to(device), y_att[picks].to(device)
        distorted = attacks[shown](model, x, y, show_eps, target=target)
        if shown == "fgsm":
            with eval_mode(model):
                noise = attack_direction(model, x, y, target)
        else:  # PGD's noise is what it added, rescaled to [-1, 1]; the ε-ball bounds it
            noise = (distorted - x) / (EPS_SCALE * show_eps) if show_eps > 0 else torch.zeros_like(x)
        probs = [_classify(model, z).cpu() for z in (x, noise, distorted)]
        for k, i in enumerate(picks):
            examples.append({
                "dev_index": int(attacked_index[i]), "true": CLASSES[int(y_att[i])],
                "original": x[k].cpu(), "noise": noise[k].cpu(), "distorted": distorted[k].cpu(),
                "probs": [p[k] for p in probs],
            })
    label = titles[shown]
    if target is not None:
        label += f" → {CLASSES[target]}"
    records = save_examples(out / "adversarial", examples, show_eps, label, target)
    if files is not None:  # an image folder: name the photo behind each example
        for record in records:
            record["file"] = printable_path(files[record["dev_index"]])

    report = {
        "checkpoint": str(args.checkpoint),
        "data": str(args.data),
        **({"skipped": skipped} if files is not None else {}),
        "device": str(device),
        "epsilon_scale": "epsilon on the [0, 1] pixel scale; 2*epsilon in the normalized [-1, 1] space",
        "accuracy_definitions": {
            "accuracy_attacked": "share of the attacked images (correctly classified"
                                 + (", true class != target" if target is not None else "")
                                 + ") still classified correctly",
            "accuracy_dev": "share of all dev images classified correctly; images not attacked keep their clean "
                            "prediction",
            "target_success": "share of the attacked images classified as the target class",
            "flips": "attacked images: {true class: {predicted class: count}}",
        },
        "attack": args.attack,
        "target": args.target,
        "pgd": {"steps": args.steps, "step_size": args.step_size or "epsilon/4",
                "random_start": args.random_start} if args.attack == "pgd" else None,
        "seed": args.seed,
        "seconds": round(seconds, 2),
        **{k: v for k, v in summary.items() if k != "attacked_index"},
        "example_epsilon": show_eps,
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
