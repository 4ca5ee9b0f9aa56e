"""The figures of adversarialExample.py: original + ε × noise = distorted (Goodfellow et al.'s
Figure 5), accuracy against ε, and several models compared. Drawing only: the attacks and the
choice of examples are the script's.
"""
from pathlib import Path

from cli import pyplot, save_figure, save_image
from dataset import CLASSES
from images import to_unit


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
        save_image(_rgb(ex["original"]), files["original"])
        save_image(_grey(ex["noise"]), files["noise"], cmap="gray", vmin=-1, vmax=1)
        save_image(_rgb(ex["distorted"]), files["distorted"])

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


STYLES = {"fgsm": ("tab:blue", "o-"), "pgd": ("tab:red", "s-"), "transfer": ("tab:green", "^--"),
          "worst": ("black", "d-")}


def plot_accuracy(summary, path, target=None, titles=None):
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for name, rows in summary["results"].items():
        eps = [r["epsilon"] for r in rows]
        label = (titles or {}).get(name, name.upper())
        colour, style = STYLES.get(name, (None, "o-"))
        if target is None:
            ax.plot(eps, [100 * r["accuracy_attacked"] for r in rows], style, color=colour,
                    label=f"{label}: attacked set")
            ax.plot(eps, [100 * r["balanced_dev"] for r in rows], style.rstrip("-:") + ":", color=colour,
                    alpha=0.6, label=f"{label}: dev, balanced")
        else:
            ax.plot(eps, [100 * r["accuracy_attacked"] for r in rows], style, color=colour,
                    label=f"{label}: attacked set")
            ax.plot(eps, [100 * r["target_success"] for r in rows], "^:", color=colour,
                    label=f"{label}: classified as {CLASSES[target]}")
    ax.set_xlabel("ε ([0, 1] pixel scale)")
    ax.set_ylabel("%")
    kind = f"targeted → {CLASSES[target]}" if target is not None else "untargeted, worst case over ε' ≤ ε"
    ax.set_title(f"Accuracy under attack ({kind})\nclean dev accuracy {summary['clean_accuracy']:.1%}, "
                 f"balanced {summary['clean_balanced_accuracy']:.1%}", fontsize=10)
    ax.set_ylim(-2, 102)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, path)


def plot_compare(summaries, path, titles):
    """One figure: balanced dev accuracy under each attack against ε, a colour per checkpoint."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.6))
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    marks = {"fgsm": "o:", "pgd": "s--", "transfer": "^-.", "worst": "d-"}
    for k, (model_name, summary) in enumerate(summaries.items()):
        for name, rows in summary["results"].items():
            ax.plot([r["epsilon"] for r in rows], [100 * r["balanced_dev"] for r in rows], marks.get(name, "o-"),
                    color=colours[k % len(colours)], label=f"{model_name}: {titles.get(name, name)}",
                    lw=2 if name == "worst" else 1.2)
    ax.set_xlabel("ε ([0, 1] pixel scale)")
    ax.set_ylabel("balanced accuracy on dev under attack (%)")
    ax.set_title("Robustness compared (worst case over ε' ≤ ε; ε = 0 is clean accuracy)", fontsize=10)
    ax.set_ylim(-2, 102)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    save_figure(fig, path)
