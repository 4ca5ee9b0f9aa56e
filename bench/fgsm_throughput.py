"""FGSM throughput: the batched attack against the tutorial's one-image-at-a-time loop.

    python bench/fgsm_throughput.py                                   # untrained SimpleModel
    python bench/fgsm_throughput.py --checkpoint checkpoints/trained.ckpt

Both attack the same dev images with the same model at the same epsilon and then
classify the result (as measuring accuracy does). Speed does not depend on the weights,
so without --checkpoint a freshly initialized SimpleModel is used. Prints images/second
of each, the ratio, and checks that both produce the same adversarial images.

  loop:    per image: requires_grad, forward, model.zero_grad(), loss.backward(),
           x + eps * sign(x.grad), forward again (the PyTorch FGSM tutorial's way)
  batched: attacks.fgsm_perturb on --batch-size images at once
"""
import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from attacks import EPS_SCALE, fgsm_perturb  # noqa: E402
from cli import UserError, pick_device, run_main  # noqa: E402
from dataset import DEV_PATH, ensure_data, load_pickle  # noqa: E402
from models import SimpleModel, load_model  # noqa: E402


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def loop_attack(model, images, labels, epsilon, device):
    """The tutorial's FGSM: one image per forward/backward, parameter gradients included."""
    adversarial, preds = [], []
    for x, y in zip(images, labels):
        x = x[None].to(device).requires_grad_(True)
        y = y[None].to(device)
        loss = F.cross_entropy(model(x), y)
        model.zero_grad()
        loss.backward()
        # Fixed against the tutorial: 2*eps in normalized space, clamp to [-1, 1], not [0, 1].
        adv = (x + EPS_SCALE * epsilon * x.grad.sign()).clamp(-1, 1).detach()
        with torch.no_grad():
            preds.append(model(adv).argmax(1))
        adversarial.append(adv)
    return torch.cat(adversarial), torch.cat(preds)


def batched_attack(model, images, labels, epsilon, device, batch_size):
    adversarial, preds = [], []
    for start in range(0, len(images), batch_size):
        x = images[start : start + batch_size].to(device)
        y = labels[start : start + batch_size].to(device)
        adv = fgsm_perturb(model, x, y, epsilon)
        with torch.no_grad():
            preds.append(model(adv).argmax(1))
        adversarial.append(adv)
    return torch.cat(adversarial), torch.cat(preds)


def timed(fn, device, repeats):
    """Best of `repeats` runs: the least disturbed by other work on a shared machine."""
    best, result = float("inf"), None
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        result = fn()
        _sync(device)
        best = min(best, time.perf_counter() - start)
    return best, result


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", help="model to attack (default: an untrained SimpleModel)")
    parser.add_argument("--data", default=DEV_PATH, help=f"images to attack (default: {DEV_PATH})")
    parser.add_argument("--cifar-dir", help="local CIFAR-10 copy, used if the default data must be built")
    parser.add_argument("--epsilon", type=float, default=0.03, help="pixel-scale epsilon (default: 0.03)")
    parser.add_argument("--batch-size", type=int, default=250, help="batched attack's batch size (default: 250)")
    parser.add_argument("--loop-images", type=int, default=None,
                        help="time the slow loop on only the first N images (default: all)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs of each, best kept (default: 3)")
    parser.add_argument("--threads", type=int,
                        help="CPU threads for torch (default: torch's choice); on a busy machine 1 is often "
                             "fastest, as idle-spinning OpenMP threads then compete with other work")
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default: auto)")
    return parser.parse_args(argv)


def main():
    args = parse_args()
    if not 0 <= args.epsilon <= 1:
        raise UserError(f"--epsilon {args.epsilon:g} is outside [0, 1] (pixel scale)")
    if args.batch_size < 1 or args.repeats < 1 or (args.loop_images is not None and args.loop_images < 1):
        raise UserError("--batch-size, --repeats and --loop-images must be at least 1")
    if args.threads is not None:
        if args.threads < 1:
            raise UserError(f"--threads {args.threads} must be at least 1")
        torch.set_num_threads(args.threads)
    device = pick_device(args.device)
    torch.manual_seed(0)
    model = (load_model(args.checkpoint) if args.checkpoint else SimpleModel()).to(device).eval()
    ensure_data(args.data, cifar_dir=args.cifar_dir)
    images, labels = load_pickle(args.data)
    n_loop = min(len(images), args.loop_images or len(images))
    print(f"{len(images)} images from {args.data}, {type(model).__name__} "
          f"({'checkpoint ' + args.checkpoint if args.checkpoint else 'untrained'}), ε = {args.epsilon:g}, "
          f"{device}" + (f", {torch.get_num_threads()} threads" if device.type == "cpu" else ""))

    # Warm-up: first calls pay for allocator and kernel selection, which is not throughput.
    batched_attack(model, images[: args.batch_size], labels[: args.batch_size], args.epsilon, device, args.batch_size)
    loop_attack(model, images[:20], labels[:20], args.epsilon, device)

    t_batch, (adv_b, pred_b) = timed(
        lambda: batched_attack(model, images, labels, args.epsilon, device, args.batch_size), device, args.repeats)
    t_loop, (adv_l, pred_l) = timed(
        lambda: loop_attack(model, images[:n_loop], labels[:n_loop], args.epsilon, device), device, args.repeats)

    rate_batch, rate_loop = len(images) / t_batch, n_loop / t_loop
    print(f"batched (batch {args.batch_size}): {rate_batch:9.0f} images/s  ({t_batch:.2f} s for {len(images)})")
    print(f"one at a time      : {rate_loop:9.0f} images/s  ({t_loop:.2f} s for {n_loop})")
    print(f"speed-up           : {rate_batch / rate_loop:9.1f}x")
    # Same attack, so the same images, except where a gradient entry is so close to 0 that
    # batching's different summation order flips its sign.
    differ = (adv_b[:n_loop] - adv_l).abs().flatten(1).amax(1) > 1e-5
    agree = (pred_b[:n_loop] == pred_l).float().mean()
    print(f"check              : {int(differ.sum())}/{n_loop} adversarial images differ, "
          f"predictions agree on {agree:.1%}")


if __name__ == "__main__":
    run_main(main)
