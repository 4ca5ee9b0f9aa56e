"""The learning-rate study of trainer.py --lr-sweep: loss against step for several rates.

    python trainer.py --lr-sweep 1e-5 1e-4 1e-3 1e-2 1e-1 1

Each rate trains --sweep-steps steps from the same initialization at a constant rate, and
figures/lr_sweep.png draws the training loss (moving average of 20 steps, log scale), one
curve per rate; a run whose loss becomes NaN or explodes past 10x its first value is marked
"diverged" at the step it happened. figures/lr_sweep.json holds every loss.
"""
import json
import math
import sys
from pathlib import Path

from tqdm import tqdm

from cli import atomic_write, float_in, int_in, pyplot, save_figure

SWEEP_EXPLODED = 10  # a sweep run has diverged once its loss exceeds 10x its first loss


def lr_sweep(rates, steps, start_run, figures):
    """Train `steps` steps at each rate from the same start; plot loss against step.

    start_run(lr) returns run(losses, max_steps), which trains up to max_steps more steps,
    appending each loss to losses, and raises FloatingPointError when the loss stops being
    finite. A diverged run is recorded and drawn, not fatal.
    """
    results = []
    for lr in rates:
        run = start_run(lr)
        losses, diverged = [], None
        with tqdm(total=steps, desc=f"lr {lr:g}", file=sys.stderr, disable=None) as bar:
            while len(losses) < steps and diverged is None:
                try:
                    run(losses, steps - len(losses))
                except FloatingPointError:
                    diverged = f"loss became NaN or infinite at step {len(losses) + 1}"
                bar.n = len(losses)
                bar.refresh()
        # A loss that explodes far above where it started has diverged too, even if it stays
        # finite (and later sinks back to a network that predicts one class).
        exploded = next((i for i, v in enumerate(losses) if v > SWEEP_EXPLODED * losses[0]), None)
        if exploded is not None and diverged is None:
            diverged = f"loss exploded to {losses[exploded]:.3g} at step {exploded + 1}"
            losses = losses[: exploded + 1]
        tail = losses[-20:]
        final = sum(tail) / len(tail) if tail else float("nan")
        results.append({"lr": lr, "losses": losses, "diverged": diverged is not None, "why": diverged,
                        "final_loss": final})
        print(f"lr {lr:<8g} " + (f"diverged: {diverged}" if diverged else f"final loss {final:.3f}"))
    figures = Path(figures)
    plot_lr_sweep(results, figures / "lr_sweep.png")
    atomic_write(figures / "lr_sweep.json", lambda f: f.write(json.dumps(results).encode()))
    print(f"Saved {figures / 'lr_sweep.png'} and {figures / 'lr_sweep.json'}")
    return results


def smooth(values, window=20):
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v - (values[i - window] if i >= window else 0.0)
        out.append(total / min(i + 1, window))
    return out


def plot_lr_sweep(results, path):
    plt = pyplot()

    fig, ax = plt.subplots(figsize=(7, 4.5))
    # Cap the axis just above the divergence threshold, so an exploded run (1e7) does not
    # flatten the curves that matter; its cross sits at the top edge instead.
    top = 1.5 * SWEEP_EXPLODED * max((r["losses"][0] for r in results if r["losses"]), default=1.0)
    for r in results:
        label = f"lr = {r['lr']:g}" + (" (diverged)" if r["diverged"] else "")
        if r["losses"]:
            (line,) = ax.plot(range(1, len(r["losses"]) + 1), smooth(r["losses"]), label=label)
            if r["diverged"]:
                ax.plot(len(r["losses"]), min(r["losses"][-1], top), "x", color=line.get_color(), ms=10, mew=2)
        else:
            ax.plot([], [], "x", label=label + ", at step 1")
    ax.set_yscale("log")
    low = min((min(smooth(r["losses"])) for r in results if r["losses"]), default=top / 10)
    ax.set_ylim(0.8 * min(low, top / 10), top)
    ax.set_xlabel("step")
    ax.set_ylabel("training loss (moving average of 20 steps)")
    ax.set_title("Learning-rate study")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3, which="both")
    fig.tight_layout()
    save_figure(fig, path)


def add_sweep_args(parser):
    group = parser.add_argument_group("learning-rate study")
    group.add_argument("--lr-sweep", type=float_in(0, math.inf, low_open=True), nargs="+", metavar="LR",
                       help="instead of training, run short runs at these rates and plot loss against steps")
    group.add_argument("--sweep-steps", type=int_in(1, 1_000_000), default=300,
                       help="steps per --lr-sweep run (default: 300)")
