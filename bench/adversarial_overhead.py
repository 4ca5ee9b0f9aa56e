"""What adversarial training costs: seconds per epoch of standard, fgsm-rs and pgd training, in one run.

    python bench/adversarial_overhead.py [--model simple] [--steps 100] [--adv-steps 7] [--rounds 3]

Each mode runs the trainer's own epoch loop (trainer.run_epoch: balanced sampler, batched
augmentation, the attack on the augmented batch, the train step) for --steps batches of the
default training data, from the same start. The modes take turns, --rounds times, and each
mode's median is kept, so a machine whose speed drifts slows all of them alike. Prints
images/second and the ratio to standard training (goal: fgsm-rs at most 2.2, one extra
forward and backward pass per batch).
"""
import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import trainer  # noqa: E402
from cli import int_in, pick_device, run_main  # noqa: E402
from dataset import TRAIN_PATH, ensure_data, load_pickle  # noqa: E402
from models import ARCHITECTURES  # noqa: E402

MODES = ("none", "fgsm-rs", "pgd")


def timed_steps(mode, images, labels, args, device):
    """Seconds for args.steps training batches in the given adversarial mode."""
    run_args = trainer.parse_args(["--model", args.model, "--adversarial", mode, "--adv-steps", str(args.adv_steps),
                                   "--fix-labels", "none"])
    model = trainer.new_model(run_args, images, device, "bench")  # seeded; the whitening layer set from data
    optimizer, scheduler = trainer.make_optimizer(model, run_args, args.steps)
    start = time.perf_counter()
    trainer.run_epoch(model, optimizer, scheduler, images, labels, run_args, torch.Generator().manual_seed(0),
                      device, max_steps=args.steps)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="simple", choices=sorted(ARCHITECTURES))
    parser.add_argument("--steps", type=int_in(1), default=100, help="training batches per measurement")
    parser.add_argument("--adv-steps", type=int_in(1), default=7, help="PGD steps (default: 7)")
    parser.add_argument("--rounds", type=int_in(1), default=3, help="measurements per mode, taken in turn")
    parser.add_argument("--data", default=TRAIN_PATH)
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()
    device = pick_device(args.device)
    ensure_data(args.data)
    images, labels = load_pickle(args.data)
    batch = trainer.RECIPES[args.model]["batch_size"]
    times = {mode: [] for mode in MODES}
    for _ in range(args.rounds):
        for mode in MODES:
            times[mode].append(timed_steps(mode, images, labels, args, device))
    base = statistics.median(times["none"])
    print(f"{args.model}, {args.steps} batches of {batch} on {device}, median of {args.rounds} rounds taken in turn")
    print(f"{'training':<22} {'images/s':>9} {'x standard':>11}")
    for mode in MODES:
        seconds = statistics.median(times[mode])
        name = {"none": "standard", "fgsm-rs": "fgsm-rs", "pgd": f"pgd ({args.adv_steps} steps)"}[mode]
        print(f"{name:<22} {args.steps * batch / seconds:>9.0f} {seconds / base:>11.2f}")
    ratio = statistics.median(times["fgsm-rs"]) / base
    print(f"fgsm-rs costs {ratio:.2f}x standard training per epoch (goal: at most 2.2x)")


if __name__ == "__main__":
    run_main(main)
