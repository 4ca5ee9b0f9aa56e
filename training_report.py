"""What a training run says: its description, one line per epoch, and the report at its end
(training curves, training.json, the chosen epoch's dev metrics)."""
import json
import sys
from pathlib import Path

import ddp
from attacks import catastrophic_overfitting, training_step_size
from cli import atomic_write, pyplot, save_figure
from dataset import CLASSES, class_counts
from metrics import format_metrics


def epoch_line(epoch, loss, dev, val):
    """One log line per epoch: training loss, dev (and validation) per-class and balanced accuracy."""
    line = f"epoch {epoch:3d}  loss {loss:.4f}"
    for name, m in (("val", val), ("dev", dev)):
        if m is not None:
            line += f"  {name} " + "  ".join(f"{n} {m['per_class'][n]['accuracy']:.3f}" for n in CLASSES) + \
                    f"  balanced {m['balanced_accuracy']:.4f}"
    return line


def run_description(args, labels, val_size, device):
    return (f"Training {args.arch} on {len(labels)} images (labels {dict(zip(CLASSES, class_counts(labels)))}), "
            f"{args.epochs} epochs, {args.optimizer} lr {args.lr:g} {args.schedule}, batch {args.batch_size}, "
            f"sampler {args.sampler}" + (f" from epoch {args.drw_start}" if args.drw_start > 1 else "") +
            f", augment {'on' if args.augment else 'off'}, loss {args.loss}"
            + (f" tau {args.tau:g}" if args.loss == "logit-adjusted" else "")
            + (f", {args.mix} alpha {args.mix_alpha:g}" if args.mix != "none" else "")
            + (f", EMA {args.ema:g}" if args.ema else "")
            + (f", validation split {val_size} images, keep {args.select}" if val_size else "")
            + f", device {device}" + (", bfloat16 autocast (--amp)" if args.amp else "")
            + (", deterministic kernels" if args.deterministic else "")
            + (f" in each of {ddp.size()} processes, which share every batch" if ddp.size() > 1 else ""))


def report(history, best, config, elapsed, args):
    """The end of a run: training curves, training.json, the chosen epoch's dev metrics."""
    plot_training_curves(history, Path(args.figures) / "training_curves.png")
    chosen = history[-1] if best is None else next(h for h in history if h["epoch"] == best["epoch"])
    final = chosen["dev"]
    summary = {"checkpoint": str(args.out), "config": config, "train_seconds": round(elapsed, 1),
               "history": history, "selected_epoch": chosen["epoch"], "final_dev": final}
    if args.adversarial != "none":
        summary["adversarial"] = {
            "method": args.adversarial, "epsilon": args.adv_epsilon, "epsilon_scale": "[0, 1] pixels",
            "steps": args.adv_steps if args.adversarial == "pgd" else 1,
            "step_size": training_step_size(args.adversarial, args.adv_epsilon, args.adv_steps, args.adv_step_size),
            "random_start": args.adversarial != "fgsm", "catastrophic_overfitting_epoch": catastrophic_overfitting(history),
            "final_robust": chosen.get("robust"),
        }
    atomic_write(Path(args.figures) / "training.json", lambda f: f.write(json.dumps(summary, indent=1).encode()))
    if best is not None:
        print(f"Kept epoch {chosen['epoch']} (best validation balanced accuracy {best['score']:.4f})")
    print(format_metrics(final))
    print(f"Saved {args.out} ({elapsed:.0f}s of training) and {Path(args.figures) / 'training_curves.png'}")


def plot_training_curves(history, path):
    plt = pyplot()

    epochs = [h["epoch"] for h in history]
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(11, 4))
    ax_loss.plot(epochs, [h["loss"] for h in history], label="training loss")
    ax_loss.set_xlabel("epoch")
    ax_loss.set_ylabel("loss")
    ax_loss.set_title("Training loss")
    ax_loss.grid(alpha=0.3)
    for name in CLASSES:
        ax_acc.plot(epochs, [h["dev"]["per_class"][name]["accuracy"] for h in history], label=name, alpha=0.8)
    ax_acc.plot(epochs, [h["dev"]["balanced_accuracy"] for h in history], "k-", lw=2, label="balanced")
    ax_acc.set_xlabel("epoch")
    ax_acc.set_ylabel("dev accuracy")
    ax_acc.set_ylim(0, 1)
    ax_acc.set_title("Dev accuracy per class")
    ax_acc.legend()
    ax_acc.grid(alpha=0.3)
    fig.tight_layout()
    save_figure(fig, path)


def warn_missing_classes(labels, what):
    missing = [name for name, n in zip(CLASSES, class_counts(labels)) if n == 0]
    if missing:
        print(f"warning: the {what} hold no {' or '.join(missing)} images; the model cannot learn to predict "
              f"{'it' if len(missing) == 1 else 'them'}", file=sys.stderr)
