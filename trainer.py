"""Train a car/truck/cat classifier on imbalanced, noisy data.

    python trainer.py                                   # default recipe -> checkpoints/trained.ckpt
    python trainer.py --resume                          # continue an interrupted run
    python trainer.py --lr-sweep 1e-5 1e-4 1e-3 1e-2 1e-1 1   # learning-rate study
    python trainer.py --model resnet8                   # the stronger model

The recipe: a WeightedRandomSampler draws each class about equally often, batched
augmentation (flip, rotation/translation, colour jitter) stretches the few trucks and
cats, and labels that are probably wrong (cats labeled "car") are found with confident
learning on out-of-fold predictions and relabeled before the final training.
"""
import argparse
import collections
import copy
import hashlib
import json
import math
import random
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import WeightedRandomSampler
from tqdm import tqdm

from adversarialExample import EPS_SCALE, eval_mode, fgsm_perturb, pgd_perturb
from cli import (
    ArgumentParser, Interrupted, UserError, atomic_write, check_output_dir, check_output_file, exclusive_lock,
    float_in, int_in, pick_device, read_input_file, run_main, seed_type,
)
from dataset import (
    CLASSES, DEV_PATH, FIGURES_DIR, TRAIN_PATH, class_counts, ensure_data, load_pickle, pyplot, save_figure, to_unit,
)
from models import ARCHITECTURES, build_model, check_state_dict, predict_proba, read_torch_file, save_checkpoint

# Per-architecture defaults: SimpleModel keeps the course's settings (Adam 1e-3, batch 32).
RECIPES = {
    "simple": dict(epochs=60, lr=1e-3, batch_size=32, optimizer="adam", weight_decay=0.0),
    "resnet8": dict(epochs=30, lr=0.05, batch_size=64, optimizer="sgd", weight_decay=5e-4),
    # The airbench-style net learns fast and then memorizes the trucks: 15 epochs beat 30.
    "whitened": dict(epochs=15, lr=0.05, batch_size=64, optimizer="sgd", weight_decay=5e-4),
    # --model best: the best recipe found (docs/study_results.md), whatever its architecture.
    "best": dict(arch="whitened", epochs=15, lr=0.05, batch_size=64, optimizer="sgd", weight_decay=5e-4,
                 mix="cutmix"),
}
# Defaults of the imbalance treatments, for any recipe that does not set them.
TREATMENT_DEFAULTS = dict(loss="ce", tau=1.0, drw_start=0, mix="none", mix_alpha=1.0, ema=0.0)
# The fold models of --fix-labels auto, by --repair-model: a recipe and its epochs per fold.
REPAIR_RECIPES = {
    "simple": dict(RECIPES["simple"], repair_epochs=8),
    "best": dict(RECIPES["best"], repair_epochs=10),
}


def parse_args(argv=None):
    parser = ArgumentParser(description=__doc__)
    lr_type = float_in(0, math.inf, low_open=True)
    parser.add_argument("--data", default=TRAIN_PATH, help=f"training pickle (default: {TRAIN_PATH})")
    parser.add_argument("--dev-data", default=DEV_PATH, help=f"dev pickle for per-epoch scores (default: {DEV_PATH})")
    parser.add_argument("--cifar-dir", help="local CIFAR-10 copy used if the default data must be built")
    parser.add_argument("--model", default="simple", choices=sorted({*ARCHITECTURES, "best"}),
                        help="architecture, or best: the best recipe (default: simple)")
    parser.add_argument("--epochs", type=int_in(1, 100_000), help="epochs (default: 60 simple, 30 resnet8, 15 whitened and best)")
    parser.add_argument("--lr", type=lr_type, help="peak learning rate (default: 1e-3 Adam for simple, 0.05 SGD for the others)")
    parser.add_argument("--batch-size", type=int_in(1, 65536), help="batch size (default: 32 for simple, 64 for the others)")
    parser.add_argument("--optimizer", choices=("adam", "sgd"), help="optimizer (default: per model)")
    parser.add_argument("--weight-decay", type=float_in(0, 1), help="weight decay (default: per model)")
    parser.add_argument("--schedule", choices=("constant", "cosine", "onecycle"), default="onecycle",
                        help="learning-rate schedule (default: onecycle)")
    parser.add_argument("--label-smoothing", type=float_in(0, 1, high_open=True), default=0.0, help="cross-entropy label smoothing (default: 0)")
    parser.add_argument("--sampler", choices=("balanced", "sqrt", "none"), default="balanced",
                        help="balanced: WeightedRandomSampler, weight 1/class count; sqrt: weight "
                             "1/sqrt(class count); none: plain shuffling (default: balanced)")
    parser.add_argument("--augment", action=argparse.BooleanOptionalAction, default=True,
                        help="random flip, rotation/translation and colour jitter (default: on)")
    parser.add_argument("--fix-labels", default="auto", metavar="auto|none|FILE",
                        help="auto: find and relabel probable label errors; none: keep labels; FILE: JSON list of "
                             "{index, label} corrections (default: auto)")
    parser.add_argument("--repair-folds", type=int_in(2, 100), default=4, help="cross-validation folds for --fix-labels auto")
    parser.add_argument("--repair-epochs", type=int_in(1, 10_000),
                        help="epochs per fold model for --fix-labels auto (default: 8 simple, 10 best)")
    parser.add_argument("--repair-model", choices=sorted(REPAIR_RECIPES), default="simple",
                        help="fold model of --fix-labels auto: simple (fast) or best (the --model best recipe: "
                             "better repair, minutes longer) (default: simple)")
    parser.add_argument("--repair-action", choices=("relabel", "drop"), default="relabel",
                        help="what to do with the images found (default: relabel)")
    parser.add_argument("--repair-pairs", choices=("directional", "all"), default="directional",
                        help="directional: act only on one-way confusions (label noise), not on classes the "
                             "model mixes up both ways; all: act on every flag (default: directional)")
    parser.add_argument("--adversarial", choices=("none", "fgsm-rs", "pgd", "fgsm"), default="none",
                        help="adversarial training: fgsm-rs: FGSM from a random start in the eps-ball, step "
                             "1.25*eps (Wong et al. 2020); pgd: PGD from a random start, --adv-steps steps (Madry "
                             "et al. 2018); fgsm: plain FGSM without random start (prone to catastrophic "
                             "overfitting, for comparison) (default: none)")
    parser.add_argument("--adv-epsilon", type=float_in(0, 1, low_open=True), default=8 / 255, metavar="EPS",
                        help="adversarial training radius on the [0, 1] pixel scale, fractions allowed "
                             "(default: 8/255, about 0.031)")
    parser.add_argument("--adv-steps", type=int_in(1, 1000), default=7, help="PGD training steps (default: 7)")
    parser.add_argument("--adv-step-size", type=float_in(0, 1, low_open=True), metavar="STEP",
                        help="attack step on the pixel scale (default: 1.25*eps for fgsm-rs, eps for fgsm, "
                             "max(eps/4, 2.5*eps/steps) for pgd)")
    parser.add_argument("--robust-eval", type=int_in(0, 100_000), default=256, metavar="N",
                        help="with --adversarial: per epoch, FGSM and PGD-10 accuracy at --adv-epsilon on a fixed "
                             "random subset of N dev images (0: off) (default: 256)")
    add_treatment_args(parser)
    parser.add_argument("--lr-sweep", type=lr_type, nargs="+", metavar="LR",
                        help="instead of training, run short runs at these rates and plot loss against steps")
    parser.add_argument("--sweep-steps", type=int_in(1, 1_000_000), default=300, help="steps per --lr-sweep run (default: 300)")
    parser.add_argument("--out", default="checkpoints/trained.ckpt", help="checkpoint path (default: checkpoints/trained.ckpt)")
    parser.add_argument("--figures", default=FIGURES_DIR, help="folder for figures and JSON reports (default: figures)")
    parser.add_argument("--resume", action="store_true", help="continue from the resume state next to --out")
    parser.add_argument("--seed", type=seed_type, default=0,
                        help="random seed, 0 to 2**32-1; CPU runs are repeatable (default: 0)")
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:N (default: CUDA when available)")
    args = parser.parse_args(argv)
    recipe = {"arch": args.model, **TREATMENT_DEFAULTS, **RECIPES[args.model]}
    for key, value in recipe.items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    if args.repair_epochs is None:
        args.repair_epochs = REPAIR_RECIPES[args.repair_model]["repair_epochs"]
    check_treatment_args(parser, args)
    return args


# ---------------------------------------------------------------------------
# Data: sampling and batched augmentation


def balanced_weights(labels):
    """Per-sample weight 1 / (count of its class): every class is drawn about equally often."""
    counts = torch.bincount(labels, minlength=len(CLASSES)).clamp(min=1).double()
    return 1.0 / counts[labels]


def sampler_weights(labels, sampler):
    """Per-sample draw weights: balanced 1/count; sqrt 1/sqrt(count), halfway between the data's
    class shares and equal ones (each truck drawn about half as often as with balanced); none 1."""
    if sampler == "balanced":
        return balanced_weights(labels)
    if sampler == "sqrt":
        return balanced_weights(labels).sqrt()
    return torch.ones(len(labels), dtype=torch.double)


def epoch_indices(labels, sampler, generator):
    """The training order of one epoch: len(labels) draws."""
    if sampler in ("balanced", "sqrt"):
        draws = WeightedRandomSampler(sampler_weights(labels, sampler), len(labels), replacement=True,
                                      generator=generator)
        return torch.tensor(list(draws))
    return torch.randperm(len(labels), generator=generator)


def augment_batch(images, generator, max_degrees=10.0, max_shift=0.1, jitter=0.2):
    """Random horizontal flip, rotation, translation and colour jitter, drawn per image.

    torchvision's transforms draw one set of parameters per call, so on a batched tensor
    every image would get the same rotation; here the parameters are drawn per image and
    applied in one affine_grid / grid_sample call, which is what makes augmentation cheap.
    Images are [N, 3, 32, 32] in [-1, 1]; the result stays in [-1, 1].
    """
    from torchvision.transforms.v2.functional import rgb_to_grayscale

    n, device = len(images), images.device

    def uniform(low, high, *shape):
        return (torch.rand(n, *shape, generator=generator) * (high - low) + low).to(device)

    flip = torch.where(uniform(0, 1) < 0.5, -1.0, 1.0)
    angle = uniform(-max_degrees, max_degrees) * (math.pi / 180)
    shift = uniform(-2 * max_shift, 2 * max_shift, 2)  # affine_grid coordinates span [-1, 1]: width 2
    cos, sin = angle.cos()[:, None, None], angle.sin()[:, None, None]
    flip, dx, dy = flip[:, None, None], shift[:, 0, None, None], shift[:, 1, None, None]
    # The sampling grid of F.affine_grid, built by broadcasting: half the time of its batched matmul.
    h, w = images.shape[-2:]
    ys = ((torch.arange(h, device=device) * 2 + 1) / h - 1)[None, :, None]
    xs = ((torch.arange(w, device=device) * 2 + 1) / w - 1)[None, None, :]
    grid = torch.stack([cos * flip * xs - sin * ys + dx, sin * flip * xs + cos * ys + dy], -1)
    # Reflection padding fills the rotated corners with image content instead of a grey frame.
    x = F.grid_sample(images, grid, mode="bilinear", padding_mode="reflection", align_corners=False)

    # Colour jitter as in torchvision's ColorJitter (brightness, contrast, saturation), on
    # [0, 1] pixels. Grey is linear in the pixels, so one grey image serves all three steps.
    x = to_unit(x)
    grey = rgb_to_grayscale(x)
    brightness = uniform(1 - jitter, 1 + jitter, 1, 1, 1)
    x, grey = x * brightness, grey * brightness
    contrast = uniform(1 - jitter, 1 + jitter, 1, 1, 1)
    mean = grey.mean((1, 2, 3), keepdim=True)
    x, grey = (x - mean) * contrast + mean, (grey - mean) * contrast + mean
    saturation = uniform(1 - jitter, 1 + jitter, 1, 1, 1)
    x = (x - grey) * saturation + grey
    return x.clamp_(0, 1).mul_(2).sub_(1)


# ---------------------------------------------------------------------------
# Imbalance treatments: logit adjustment, deferred re-balancing, mixup / cutmix, weight
# averaging, and a validation split for choosing among checkpoints without the dev set.


def add_treatment_args(parser):
    group = parser.add_argument_group("imbalance treatments (defaults per --model recipe)")
    group.add_argument("--loss", choices=("ce", "logit-adjusted", "balanced-softmax"),
                       help="ce: cross-entropy; logit-adjusted: cross-entropy on logits + tau*log(prior) "
                            "(Menon et al. 2021); balanced-softmax: the same with tau 1 (Ren et al. 2020). The "
                            "prior is the class share of the training labels; beside the balanced sampler a small "
                            "tau pushes the model towards the rare classes (default: ce)")
    group.add_argument("--tau", type=float_in(0, 100), help="logit-adjustment strength tau (default: 1)")
    group.add_argument("--drw-start", type=int_in(0, 100_000), metavar="EPOCH",
                       help="deferred re-balancing (Cao et al. 2019): plain shuffling before this epoch, "
                            "--sampler from it on; 0 = --sampler throughout (default: 0)")
    group.add_argument("--mix", choices=("none", "mixup", "cutmix"),
                       help="mix each batch with a shuffled copy of itself: mixup blends whole images, "
                            "cutmix pastes a box; the loss mixes both labels (default: none)")
    group.add_argument("--mix-alpha", type=float_in(0, 100, low_open=True),
                       help="mixing share lambda ~ Beta(alpha, alpha) (default: 1)")
    group.add_argument("--ema", type=float_in(0, 1, high_open=True), metavar="DECAY",
                       help="keep an exponential moving average of the weights with this per-step decay and "
                            "evaluate and save it instead of the raw weights; 0 = off (default: 0)")
    parser.add_argument("--val-fraction", type=float_in(0, 0.5, high_open=True), default=0.0,
                        help="hold out this stratified, seeded share of the training images as a validation "
                             "split, scored every epoch (default: 0)")
    parser.add_argument("--select", choices=("last", "best-val"), default="last",
                        help="checkpoint to keep: last epoch, or the epoch with the best validation "
                             "balanced accuracy (needs --val-fraction) (default: last)")


def check_treatment_args(parser, args):
    if args.drw_start > args.epochs:
        parser.error(f"--drw-start {args.drw_start} is after the last epoch ({args.epochs}): the sampler would never "
                     "switch on")
    if args.drw_start > 1 and args.sampler == "none":
        parser.error("--drw-start needs a --sampler to switch to (balanced or sqrt)")
    if args.select == "best-val" and args.val_fraction == 0:
        parser.error("--select best-val needs a validation split (--val-fraction)")


def epoch_sampler(args, epoch):
    """Deferred re-balancing: plain shuffling before --drw-start, the chosen sampler from it on (epochs from 1)."""
    return "none" if epoch < args.drw_start else args.sampler


def label_log_prior(labels):
    """log of each class's share of the training labels: the prior of the logit-adjusted losses.

    It is the data's prior whatever the sampler draws (Menon et al.'s definition). With
    --sampler none, tau 1 undoes the imbalance; beside the balanced sampler the adjustment
    pushes further towards the rare classes, which a model that memorized its few trucks
    needs (its truck recall on new images lags car's); tau sets how far.
    """
    shares = torch.bincount(labels, minlength=len(CLASSES)).double()
    return (shares / shares.sum()).clamp(min=1e-12).log().float()


def logit_adjusted_cross_entropy(logits, targets, log_prior, tau=1.0, label_smoothing=0.0):
    """Menon et al. (2021): cross-entropy on logits + tau * log(prior).

    The model must outscore the prior of common classes during training, so its raw logits
    (used unchanged at test time) estimate p(x | y) rather than p(y | x): the decision that
    maximizes balanced accuracy.
    """
    return F.cross_entropy(logits + tau * log_prior.to(logits), targets, label_smoothing=label_smoothing)


def balanced_softmax_cross_entropy(logits, targets, prior, label_smoothing=0.0):
    """Ren et al. (2020): softmax with each class's exp(logit) weighted by its prior. Since
    prior_j * exp(z_j) = exp(z_j + log prior_j), this is logit adjustment with tau = 1."""
    return logit_adjusted_cross_entropy(logits, targets, prior.log(), 1.0, label_smoothing)


def mix_batch(x, y, mode, alpha, generator):
    """Mixup (Zhang et al. 2018) or CutMix (Yun et al. 2019) within a batch.

    Returns (images, labels, partner labels, lam): the loss is lam * loss(labels) +
    (1 - lam) * loss(partner labels). Every draw comes from `generator`, so runs repeat.
    """
    # torch.distributions cannot take a generator; Python's Beta sampler seeded from it can.
    lam = random.Random(int(torch.randint(2**62, (1,), generator=generator))).betavariate(alpha, alpha)
    partner = torch.randperm(len(x), generator=generator).to(x.device)
    if mode == "mixup":
        return lam * x + (1 - lam) * x[partner], y, y[partner], lam
    h, w = x.shape[-2:]
    cut_h, cut_w = round(h * math.sqrt(1 - lam)), round(w * math.sqrt(1 - lam))
    cy, cx = (int(v) for v in torch.randint(0, h, (1,), generator=generator).tolist() +
              torch.randint(0, w, (1,), generator=generator).tolist())
    top, bottom = max(cy - cut_h // 2, 0), min(cy + (cut_h + 1) // 2, h)
    left, right = max(cx - cut_w // 2, 0), min(cx + (cut_w + 1) // 2, w)
    x = x.clone()
    x[:, :, top:bottom, left:right] = x[partner, :, top:bottom, left:right]
    lam = 1 - (bottom - top) * (right - left) / (h * w)  # the box may be clipped at the border
    return x, y, y[partner], lam


def batch_loss(logits, y, y_partner, lam, args, log_prior):
    if args.loss == "ce":
        def loss(targets):
            return F.cross_entropy(logits, targets, label_smoothing=args.label_smoothing)
    else:
        tau = 1.0 if args.loss == "balanced-softmax" else args.tau
        def loss(targets):
            return logit_adjusted_cross_entropy(logits, targets, log_prior, tau, args.label_smoothing)
    return loss(y) if lam == 1 else lam * loss(y) + (1 - lam) * loss(y_partner)


def new_average(model, args):
    """The EMA weights (and batch-norm statistics) as a state dict, or None without --ema."""
    if not args.ema:
        return None
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def update_average(average, model, decay):
    """average <- decay * average + (1 - decay) * weights; integer buffers are copied."""
    with torch.no_grad():
        for name, value in model.state_dict().items():
            if value.is_floating_point():
                average[name].lerp_(value, 1 - decay)
            else:
                average[name].copy_(value)


def ema_decay(args, step):
    """--ema's decay, warmed up over the first steps ((1 + t) / (10 + t)) so early random
    weights fade out fast."""
    return min(args.ema, (1 + step) / (10 + step))


def averaged_model(model, average):
    """The model to evaluate and save: the EMA weights when averaging, else the model itself."""
    if average is None:
        return model
    copy_ = copy.deepcopy(model)
    copy_.load_state_dict(average)
    return copy_


def validation_split(labels, fraction, seed):
    """Stratified, seeded hold-out: (training indices, validation indices), disjoint, sorted.

    Each class (by given label) gives round(fraction * its count) images, at least one when
    fraction > 0. It depends only on (labels, fraction, seed), so a resumed run gets the same split.
    """
    generator = torch.Generator().manual_seed(derived_seed(seed, "validation"))
    held = []
    for c in range(len(CLASSES)):
        members = (labels == c).nonzero().flatten()
        count = max(1, round(fraction * len(members))) if fraction > 0 and len(members) > 1 else 0
        held.append(members[torch.randperm(len(members), generator=generator)[:count]])
    val = torch.cat(held).sort().values
    is_val = torch.zeros(len(labels), dtype=torch.bool)
    is_val[val] = True
    return (~is_val).nonzero().flatten(), val


def new_model(args, images, device, salt):
    """A freshly initialized --model (seeded by salt); data-dependent layers set from images."""
    seeded(args.seed, salt, "init")
    model = build_model(args.arch)
    if hasattr(model, "init_whitening"):
        model.init_whitening(images)
    # Channels-last: oneDNN's convolutions and pooling train SimpleModel about 20 % faster on
    # 2 CPU cores (the other architectures are built that way). Checkpoints are saved contiguous.
    return model.to(device, memory_format=torch.channels_last)


def train_epoch(model, optimizer, scheduler, images, labels, args, epoch, generator, device, average=None):
    """One epoch (numbered from 1) with the treatments: DRW's sampler, the loss's prior, EMA."""
    def after_step():  # the scheduler has counted the step just taken
        if average is not None:
            update_average(average, model, ema_decay(args, scheduler.last_epoch))

    return run_epoch(model, optimizer, scheduler, images, labels, args, generator, device,
                     sampler=epoch_sampler(args, epoch), after_step=after_step)


# ---------------------------------------------------------------------------
# Training


def make_optimizer(model, args, steps_total):
    params = [p for p in model.parameters() if p.requires_grad]  # frozen layers (whitening) stay out
    if args.optimizer == "adam":
        # The fused kernel updates all tensors in one call instead of a Python loop over them:
        # about 10 % of a SimpleModel epoch on 2 CPU cores.
        fused = params[0].device.type in ("cpu", "cuda") or None
        optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=args.weight_decay, fused=fused) \
            if args.weight_decay else torch.optim.Adam(params, lr=args.lr, fused=fused)
    else:
        optimizer = torch.optim.SGD(params, lr=args.lr, momentum=0.9, nesterov=True, weight_decay=args.weight_decay)
    if args.schedule == "onecycle":
        scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=args.lr, total_steps=steps_total,
                                                        pct_start=0.15, anneal_strategy="cos")
    elif args.schedule == "cosine":
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=steps_total)
    else:
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    return optimizer, scheduler


# ---------------------------------------------------------------------------
# Adversarial training


def adv_step_size(args):
    if args.adv_step_size is not None:
        return args.adv_step_size
    if args.adversarial == "fgsm-rs":
        return 1.25 * args.adv_epsilon  # Wong, Rice & Kolter 2020: 1.25*eps from a uniform start
    if args.adversarial == "pgd":
        return max(args.adv_epsilon / 4, 2.5 * args.adv_epsilon / args.adv_steps)  # Madry et al.'s 2.5*eps/k
    return args.adv_epsilon


def adversarial_batch(model, x, y, args, generator):
    """The batch to train on: x itself, or the attacked x inside the eps-ball (in [-1, 1]).

    x is the augmented batch, so the attack sees what the model sees. The model stays in
    train mode as in Wong et al. and Madry et al. The random start is drawn from the epoch's
    generator, so runs and resumed runs repeat exactly.
    """
    if args.adversarial == "none":
        return x
    if x.device.type == "cpu":
        # oneDNN computes the input gradient of the first (3-channel) convolution, which plain
        # training never needs, markedly faster on channels-last batches.
        x = x.contiguous(memory_format=torch.channels_last)
    radius = EPS_SCALE * args.adv_epsilon
    step = EPS_SCALE * adv_step_size(args)
    steps = args.adv_steps if args.adversarial == "pgd" else 1
    if args.adversarial == "fgsm":
        delta = torch.zeros_like(x)
    else:
        delta = ((torch.rand(x.shape, generator=generator) * 2 - 1) * radius).to(x.device)
        delta = (x + delta).clamp(-1, 1) - x
    for _ in range(steps):
        delta.requires_grad_(True)
        loss = F.cross_entropy(model(x + delta), y)
        (grad,) = torch.autograd.grad(loss, delta)  # input gradient only: the weights' .grad stay untouched
        delta = (delta.detach() + step * grad.sign()).clamp(-radius, radius)
        delta = (x + delta).clamp(-1, 1) - x
    return (x + delta).detach()


@torch.no_grad()
def _accuracy(model, x, y):
    return float((model(x).argmax(1) == y).float().mean())


def robust_accuracy(model, x, y, args, generator):
    """Clean, FGSM and PGD-10 (random start) accuracy on a fixed dev subset at --adv-epsilon.

    Catastrophic overfitting shows here first: FGSM accuracy stays high while PGD
    accuracy collapses to about zero within an epoch.
    """
    with eval_mode(model):
        return {
            "clean": _accuracy(model, x, y),
            "fgsm": _accuracy(model, fgsm_perturb(model, x, y, args.adv_epsilon), y),
            "pgd": _accuracy(model, pgd_perturb(model, x, y, args.adv_epsilon, steps=10, random_start=True,
                                                generator=generator), y),
        }


def catastrophic_overfitting(history):
    """The first epoch whose PGD accuracy collapsed while FGSM accuracy stayed high, or None.

    The known failure of FGSM training (Wong et al. 2020): within an epoch the model learns
    to defeat the single-step attack by bending its loss surface, and robustness to a real
    (multi-step) attack falls to about zero, or never rises from it. The sign: PGD accuracy
    near zero (or a quarter of its best) while FGSM, whose step is about PGD's first, barely
    hurts (FGSM accuracy at least 70 % of clean accuracy and 30 points above PGD's). Healthy
    fgsm-rs runs here keep FGSM within 10 points of PGD.
    """
    best = 0.0
    for h in history:
        robust = h.get("robust")
        if not robust:
            continue
        collapsed = robust["pgd"] <= max(0.05, 0.25 * best)
        single_step_fooled = robust["fgsm"] >= 0.7 * robust["clean"] and robust["fgsm"] - robust["pgd"] >= 0.3
        if collapsed and single_step_fooled:
            return h["epoch"]
        best = max(best, robust["pgd"])
    return None


def run_epoch(model, optimizer, scheduler, images, labels, args, generator, device, max_steps=None, losses=None,
              sampler=None, after_step=None):
    """One pass of len(labels) sampled, augmented images; returns the loss of every step
    (appended to `losses` when given, so a caller keeps them if the epoch fails).

    sampler overrides args.sampler (deferred re-balancing); after_step() runs after every
    optimizer step (weight averaging). The logit-adjusted losses use the prior of `labels`.
    Raises FloatingPointError when the loss stops being finite.
    """
    model.train()
    order = epoch_indices(labels, args.sampler if sampler is None else sampler, generator)
    log_prior = None if args.loss == "ce" else label_log_prior(labels)
    if max_steps is not None:
        order = order[: max_steps * args.batch_size]
    losses = [] if losses is None else losses
    # Augment about 1,024 images at a time (whole batches): one big grid_sample beats many small ones.
    chunk = args.batch_size * max(1, 1024 // args.batch_size)
    for start in range(0, len(order), chunk):
        idx = order[start : start + chunk]
        x_chunk = images[idx].to(device, non_blocking=True)
        y_chunk = labels[idx].to(device, non_blocking=True)
        if args.augment:
            x_chunk = augment_batch(x_chunk, generator)
        for b in range(0, len(idx), args.batch_size):
            x, y = x_chunk[b : b + args.batch_size], y_chunk[b : b + args.batch_size]
            x = adversarial_batch(model, x, y, args, generator)  # attack first: mixing then mixes attacked images
            x, y, y_partner, lam = (mix_batch(x, y, args.mix, args.mix_alpha, generator) if args.mix != "none"
                                    else (x, y, y, 1.0))
            loss = batch_loss(model(x), y, y_partner, lam, args, log_prior)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            if after_step is not None:
                after_step()
            value = loss.item()
            if not math.isfinite(value):
                raise FloatingPointError(f"loss became {value} at step {len(losses) + 1} of the epoch")
            losses.append(value)
    return losses


def derived_seed(seed, *salt):
    # Python's hash() of strings changes between processes; a digest does not.
    return int.from_bytes(hashlib.sha256(repr((seed, *salt)).encode()).digest()[:7], "little")


def seeded(seed, *salt):
    """A generator derived from (seed, salt): each epoch's randomness depends on nothing else,
    so a resumed run draws exactly what the uninterrupted run would have drawn."""
    value = derived_seed(seed, *salt)
    torch.manual_seed(value)  # dropout draws from the global generator
    return torch.Generator().manual_seed(value)


def fit(images, labels, args, device, epochs, salt):
    """Train a fresh model for `epochs` epochs without evaluation or checkpoints (used by repair folds)."""
    model = new_model(args, images, device, salt)
    optimizer, scheduler = make_optimizer(model, args, epochs * math.ceil(len(labels) / args.batch_size))
    average = new_average(model, args)
    # disable=None: no bar when stderr is not a terminal (log files, CI); the fold's line still prints.
    for epoch in tqdm(range(epochs), desc=f"  {salt} epochs", leave=False, file=sys.stderr, disable=None):
        train_epoch(model, optimizer, scheduler, images, labels, args, epoch + 1, seeded(args.seed, salt, epoch),
                    device, average)
    return averaged_model(model, average)


# ---------------------------------------------------------------------------
# Label repair


def out_of_fold_probabilities(images, labels, args, device):
    """Predicted probabilities for every training image from a model that never trained on it."""
    from sklearn.model_selection import StratifiedKFold

    folds = StratifiedKFold(n_splits=args.repair_folds, shuffle=True, random_state=args.seed)
    probs = torch.zeros(len(labels), len(CLASSES))
    start = time.time()
    # The fold models follow --repair-model's recipe (SimpleModel by default), whatever --model
    # is: k of them must fit in the time budget. No deferred re-balancing: the folds are short.
    # They train plainly even when the final model trains adversarially: they only rank labels.
    recipe = {key: value for key, value in REPAIR_RECIPES[args.repair_model].items() if key != "repair_epochs"}
    fold_args = argparse.Namespace(**{**vars(args), "arch": args.repair_model, **TREATMENT_DEFAULTS, **recipe,
                                      "model": args.repair_model, "adversarial": "none"})
    for k, (train_idx, held_idx) in enumerate(folds.split(labels.numpy(), labels.numpy())):
        train_idx, held_idx = torch.from_numpy(train_idx), torch.from_numpy(held_idx)
        try:
            model = fit(images[train_idx], labels[train_idx], fold_args, device, args.repair_epochs, f"fold{k + 1}")
        except FloatingPointError as e:
            raise UserError(f"label repair: fold model {k + 1} diverged ({e}); use --repair-model simple, or "
                            "--fix-labels none") from None
        probs[held_idx] = predict_proba(model, images[held_idx], device, flip=True)
        print(f"  fold {k + 1}/{args.repair_folds}: held-out agreement with given labels "
              f"{(probs[held_idx].argmax(1) == labels[held_idx]).float().mean():.3f} "
              f"({time.time() - start:.0f}s)", file=sys.stderr)
    return probs


def find_label_issues(labels, probs):
    """Confident learning (cleanlab): indices whose given label is probably wrong, most certain first."""
    from cleanlab.filter import find_label_issues as cleanlab_find

    return torch.from_numpy(
        cleanlab_find(labels.numpy(), probs.numpy(), return_indices_ranked_by="self_confidence").copy()
    ).long()


def directional_pairs(given, suggested, class_sizes, factor=3.0):
    """Which flagged (given -> suggested) pairs look like label noise rather than model confusion.

    A classifier that mixes up two classes (car and truck) is wrong both ways, and relabeling
    those flags teaches it the confusion; label noise (cats filed as "car") runs one way. A
    pair passes when its flag rate (flags / images given that label) is at least `factor`
    times the rate of the reverse pair, and so is its count of flags. The count matters for
    strong fold models: their few errors on a rare class (30 of 400 trucks taken for cars)
    are a high rate against the reverse (80 of 4,600 cars taken for trucks) but no majority
    of the flags. Returns a [C, C] boolean matrix.
    """
    num_classes = len(class_sizes)
    flags = torch.zeros(num_classes, num_classes)
    flags.index_put_((given, suggested), torch.ones(len(given)), accumulate=True)
    rate = flags / class_sizes.clamp(min=1).float()[:, None]
    return (flags > 0) & (rate >= factor * rate.T) & (flags >= factor * flags.T)


def find_label_repairs(labels, probs, pairs="directional"):
    """Flag probable label errors; return (indices, suggested labels, confidence, act mask)."""
    issues = find_label_issues(labels, probs)
    suggested = probs[issues].argmax(1)
    confidence = probs[issues, suggested]
    if pairs == "all":
        act = torch.ones(len(issues), dtype=torch.bool)
    else:
        sizes = torch.bincount(labels, minlength=probs.shape[1])
        act = directional_pairs(labels[issues], suggested, sizes)[labels[issues], suggested]
    return issues, suggested, confidence, act


def read_corrections(path, n):
    """A hand-made list of corrections: [{"index": i, "label": "cat" | 2 | null}, ...]; null drops the image.

    Strict on purpose: an index of 1.9 or a label of true is a mistake to report, not a value
    to truncate, and an index listed twice would silently keep only one of the two labels.
    """
    where = f"--fix-labels {path}"
    data = read_input_file(path, "label corrections")
    try:
        entries = json.loads(data.decode("utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
        raise UserError(f"{where}: not valid JSON ({' '.join(str(e).split())[:100]})") from None
    if isinstance(entries, dict) and isinstance(entries.get("issues"), list):  # our own label_issues.json
        try:
            entries = [{"index": e["index"], "label": e["suggested"]} for e in entries["issues"]
                       if e.get("acted", True) is not False]
        except (TypeError, KeyError, AttributeError):
            raise UserError(f"{where}: a label_issues.json whose issues lack index or suggested") from None
    if not isinstance(entries, list):
        raise UserError(f"{where}: expected a list of {{\"index\": i, \"label\": name}} entries")
    fixes, seen = {}, {}
    for k, entry in enumerate(entries):
        if not isinstance(entry, dict) or set(entry) != {"index", "label"}:
            raise UserError(f"{where}: entry {k} must be an object with exactly the keys index and label")
        index, label = entry["index"], entry["label"]
        if not isinstance(index, int) or isinstance(index, bool) or not 0 <= index < n:
            raise UserError(f"{where}: entry {k}: index {json.dumps(index)} is not a whole number from 0 to {n - 1}")
        if isinstance(label, str) and label in CLASSES:
            label = CLASSES.index(label)
        elif label is not None and not (isinstance(label, int) and not isinstance(label, bool)
                                        and 0 <= label < len(CLASSES)):
            raise UserError(f"{where}: entry {k}: label {json.dumps(label)} is not one of {', '.join(CLASSES)}, "
                            "0-2, or null (drop the image)")
        if index in seen:
            raise UserError(f"{where}: entries {seen[index]} and {k} both correct image {index}; keep one")
        seen[index] = k
        fixes[index] = label
    return fixes


def plot_flagged(images, given, suggested, confidence, path, limit=40):
    plt = pyplot()

    n = min(limit, len(given))
    cols = 8
    rows = max(1, math.ceil(n / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(cols * 1.3, rows * 1.55), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for k in range(n):
        ax = axes.flat[k]
        ax.imshow(to_unit(images[k]).permute(1, 2, 0).clamp(0, 1).numpy())
        ax.set_title(f"{CLASSES[given[k]]}\u2192{CLASSES[suggested[k]]}\n{confidence[k]:.2f}", fontsize=8)
    fig.suptitle(f"Probable label errors (given \u2192 suggested, confidence); {n} of {len(given)} shown")
    fig.tight_layout()
    save_figure(fig, path, dpi=110)


def repair_labels(images, labels, args, device):
    """Apply --fix-labels; return (labels to train on, mask of images to keep)."""
    labels, keep = labels.clone(), torch.ones(len(labels), dtype=torch.bool)
    if args.fix_labels == "none":
        return labels, keep
    if args.fix_labels != "auto":
        fixes = read_corrections(args.fix_labels, len(labels))
        for index, label in fixes.items():
            if label is None:
                keep[index] = False
            else:
                labels[index] = label
        print(f"Applied {len(fixes)} label corrections from {args.fix_labels} "
              f"({int((~keep).sum())} images dropped)", file=sys.stderr)
        return labels, keep

    start = time.time()
    print(f"Label repair: {args.repair_folds}-fold out-of-fold predictions "
          f"({args.repair_model} fold models, {args.repair_epochs} epochs per fold) ...", file=sys.stderr)
    probs = out_of_fold_probabilities(images, labels, args, device)
    issues, suggested, confidence, act = find_label_repairs(labels, probs, args.repair_pairs)
    report = {
        "method": f"confident learning (cleanlab) on {args.repair_folds}-fold out-of-fold probabilities; "
                  f"acting on {args.repair_pairs} pairs",
        "action": args.repair_action,
        "flagged": len(issues),
        "acted_on": int(act.sum()),
        "issues": [
            {"index": i, "given": CLASSES[labels[i]], "suggested": CLASSES[s], "confidence": round(c, 4), "acted": a}
            for i, s, c, a in zip(issues.tolist(), suggested.tolist(), confidence.tolist(), act.tolist())
        ],
    }
    figures = Path(args.figures)
    atomic_write(figures / "label_issues.json", lambda f: f.write(json.dumps(report, indent=1).encode()))
    fix, to = issues[act], suggested[act]
    plot_flagged(images[fix], labels[fix].tolist(), to.tolist(), confidence[act].tolist(), figures / "label_issues.png")
    pairs = collections.Counter(f"{CLASSES[g]}->{CLASSES[s]}" + ("" if a else " (kept)")
                                for g, s, a in zip(labels[issues].tolist(), suggested.tolist(), act.tolist()))
    print(f"Label repair: {len(issues)} flagged {dict(pairs)} in {time.time() - start:.0f}s; "
          f"{args.repair_action} {len(fix)} (list: {figures / 'label_issues.json'})", file=sys.stderr)
    if args.repair_action == "relabel":
        labels[fix] = to
    else:
        keep[fix] = False
    return labels, keep


# ---------------------------------------------------------------------------
# Learning-rate study


SWEEP_EXPLODED = 10  # a sweep run has diverged once its loss exceeds 10x its first loss


def lr_sweep(images, labels, args, device):
    """Short runs at each rate; a diverged run is recorded and drawn, not fatal."""
    results = []
    for lr in args.lr_sweep:
        run_args = argparse.Namespace(**{**vars(args), "lr": lr, "schedule": "constant"})
        model = new_model(args, images, device, "sweep")
        optimizer, scheduler = make_optimizer(model, run_args, args.sweep_steps)
        losses, diverged, generator = [], None, seeded(args.seed, "sweep")
        with tqdm(total=args.sweep_steps, desc=f"lr {lr:g}", file=sys.stderr, disable=None) as bar:
            while len(losses) < args.sweep_steps and diverged is None:
                try:
                    run_epoch(model, optimizer, scheduler, images, labels, run_args, generator, device,
                              max_steps=args.sweep_steps - len(losses), losses=losses)
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
    figures = Path(args.figures)
    plot_lr_sweep(results, figures / "lr_sweep.png")
    atomic_write(figures / "lr_sweep.json", lambda f: f.write(json.dumps(results).encode()))
    print(f"Saved {figures / 'lr_sweep.png'} and {figures / 'lr_sweep.json'}")


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


# ---------------------------------------------------------------------------
# The main run: epochs, evaluation, checkpoints, resume


def resume_path(out):
    return Path(out).with_suffix(".resume.pt")


RUN_KEYS = ("model", "epochs", "lr", "batch_size", "optimizer", "weight_decay", "schedule", "label_smoothing",
            "sampler", "augment", "fix_labels", "repair_folds", "repair_epochs", "repair_action", "repair_pairs",
            "seed", "data", "adversarial", "adv_epsilon", "adv_steps", "adv_step_size", "robust_eval",
            "arch", "loss", "tau", "drw_start", "mix", "mix_alpha", "ema", "val_fraction", "select", "repair_model")


def data_fingerprint(images, labels):
    """SHA-256 of the training tensors: a resume must continue on the very data it started on."""
    digest = hashlib.sha256(images.contiguous().numpy().tobytes())
    digest.update(labels.numpy().astype("int64").tobytes())
    return digest.hexdigest()


def load_resume(path, args, fingerprint):
    if not Path(path).exists():
        raise UserError(f"--resume: no resume state at {path} (start without --resume)")
    state = read_torch_file(path, "resume state")
    needed = {"model", "optimizer", "scheduler", "epoch", "history", "labels", "keep", "config", "data_sha256"}
    if not isinstance(state, dict) or not needed <= set(state) or not isinstance(state["config"], dict):
        raise UserError(f"--resume: {path} is not a resume state of this trainer.py; delete it to start over")
    changed = [k for k in RUN_KEYS if state["config"].get(k) != getattr(args, k)]
    if changed:
        raise UserError(f"--resume: {path} belongs to a run with other settings ({', '.join(changed)}); "
                        "use the same flags or start without --resume")
    if state["data_sha256"] != fingerprint:
        raise UserError(f"--resume: {args.data} has changed since {path} was written (its stored labels belong to "
                        "other images); restore that data or start without --resume")
    n = len(state["labels"]) if isinstance(state["labels"], torch.Tensor) else -1
    if not (isinstance(state["epoch"], int) and 1 <= state["epoch"] <= args.epochs and n == len(state["keep"])):
        raise UserError(f"--resume: {path} is inconsistent (epoch or label count); delete it to start over")
    return state


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


def scores(model, images, labels, device):
    from tester import compute_metrics

    return compute_metrics(labels.numpy(), predict_proba(model, images, device).argmax(1).numpy())


def epoch_line(epoch, loss, dev, val):
    """One log line per epoch: training loss, dev (and validation) per-class and balanced accuracy."""
    line = f"epoch {epoch:3d}  loss {loss:.4f}"
    for name, m in (("val", val), ("dev", dev)):
        if m is not None:
            line += f"  {name} " + "  ".join(f"{n} {m['per_class'][n]['accuracy']:.3f}" for n in CLASSES) + \
                    f"  balanced {m['balanced_accuracy']:.4f}"
    return line


def train(train_x, train_y, dev_x, dev_y, args, device):
    from tester import format_metrics

    state_path = resume_path(args.out)
    fingerprint = data_fingerprint(train_x, train_y)
    state = load_resume(state_path, args, fingerprint) if args.resume else None
    if state is not None:
        all_labels, keep = state["labels"], state["keep"]
        print(f"Resuming {state_path} after epoch {state['epoch']} of {args.epochs}", file=sys.stderr)
    else:
        try:
            all_labels, keep = repair_labels(train_x, train_y, args, device)
        except KeyboardInterrupt:
            raise Interrupted("interrupted during label repair, before training started: nothing was saved; "
                              "run again, or skip repair with --fix-labels none") from None
    if not keep.any():
        raise UserError(f"--fix-labels {args.fix_labels}: drops every training image; nothing left to train on")
    # The validation split is carved from the given labels before anything else, seeded: the same
    # images on every run and resume, never trained on. Its labels are the repaired ones.
    train_idx, val_idx = validation_split(train_y, args.val_fraction, args.seed)
    train_idx, val_idx = train_idx[keep[train_idx]], val_idx[keep[val_idx]]
    images, labels = train_x[train_idx], all_labels[train_idx]
    val_x, val_y = train_x[val_idx], all_labels[val_idx]
    warn_missing_classes(labels, "training labels")
    print(f"Training {args.arch} on {len(labels)} images (labels {dict(zip(CLASSES, class_counts(labels)))}), "
          f"{args.epochs} epochs, {args.optimizer} lr {args.lr:g} {args.schedule}, batch {args.batch_size}, "
          f"sampler {args.sampler}" + (f" from epoch {args.drw_start}" if args.drw_start > 1 else "") +
          f", augment {'on' if args.augment else 'off'}, loss {args.loss}"
          + (f" tau {args.tau:g}" if args.loss == "logit-adjusted" else "")
          + (f", {args.mix} alpha {args.mix_alpha:g}" if args.mix != "none" else "")
          + (f", EMA {args.ema:g}" if args.ema else "")
          + (f", validation split {len(val_y)} images, keep {args.select}" if len(val_y) else "")
          + f", device {device}", file=sys.stderr)

    model = new_model(args, images, device, "main")
    optimizer, scheduler = make_optimizer(model, args, args.epochs * math.ceil(len(labels) / args.batch_size))
    average = new_average(model, args)
    history, first_epoch, best = [], 1, None
    if state is not None:
        check_state_dict(model, state["model"], state_path)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        history, first_epoch = state["history"], state["epoch"] + 1
        average, best = state.get("average"), state.get("best")
        if average is not None:
            check_state_dict(model, average, state_path)
            average = {k: v.to(device) for k, v in average.items()}

    config = {k: getattr(args, k) for k in RUN_KEYS}
    robust_x = robust_y = None
    if args.adversarial != "none" and args.robust_eval:
        # A fixed subset, the same every epoch and after a resume, so the numbers compare.
        subset = torch.randperm(len(dev_y), generator=torch.Generator().manual_seed(args.seed))[: args.robust_eval]
        robust_x, robust_y = dev_x[subset].to(device), dev_y[subset].to(device)
    start = time.time()
    # disable=None: no bar when stderr is not a terminal (log files, CI); the epoch lines still print.
    bar = tqdm(range(first_epoch, args.epochs + 1), initial=first_epoch - 1, total=args.epochs,
               desc="epochs", file=sys.stderr, disable=None)
    try:
        for epoch in bar:
            try:
                losses = train_epoch(model, optimizer, scheduler, images, labels, args, epoch,
                                     seeded(args.seed, "main", epoch), device, average)
            except FloatingPointError as e:
                raise UserError(f"training diverged in epoch {epoch} ({e}): lower the learning rate "
                                f"(--lr {args.lr:g}); the last good state is in {state_path}") from None
            scored = averaged_model(model, average)
            dev = scores(scored, dev_x, dev_y, device)
            val = scores(scored, val_x, val_y, device) if len(val_y) else None
            history.append({"epoch": epoch, "loss": sum(losses) / len(losses), "dev": dev, "val": val})
            line = epoch_line(epoch, history[-1]["loss"], dev, val)
            if robust_x is not None:
                robust = robust_accuracy(scored, robust_x, robust_y, args, seeded(args.seed, "robust", epoch))
                history[-1]["robust"] = robust
                line += f"  |  {len(robust_y)} dev images at eps {args.adv_epsilon:.4g}: clean {robust['clean']:.3f}" \
                        f" fgsm {robust['fgsm']:.3f} pgd {robust['pgd']:.3f}"
            bar.set_postfix(loss=f"{history[-1]['loss']:.3f}", bal=f"{dev['balanced_accuracy']:.3f}")
            tqdm.write(line, file=sys.stderr)
            overfit = catastrophic_overfitting(history)
            if overfit is not None and overfit == epoch:
                tqdm.write(f"warning: catastrophic overfitting in epoch {epoch}: PGD accuracy on the dev subset "
                           f"collapsed to {history[-1]['robust']['pgd']:.3f} while FGSM accuracy is "
                           f"{history[-1]['robust']['fgsm']:.3f}; the model defeats the single-step attack only. "
                           + ("Use --adversarial fgsm-rs or pgd" if args.adversarial == "fgsm" else
                              "Use --adversarial pgd or a smaller --adv-step-size") + " or --adv-epsilon",
                           file=sys.stderr)
            # Checkpoint selection looks at the validation split only, never at dev. With best-val
            # the checkpoint is rewritten only when the epoch beats the kept one.
            improved = args.select == "best-val" and (best is None or val["balanced_accuracy"] > best["score"])
            if improved:
                best = {"epoch": epoch, "score": val["balanced_accuracy"]}
            # The checkpoint first, then the resume state: a kill between them loses nothing.
            if args.select == "last" or improved:
                save_checkpoint(scored, args.out)
            snapshot = {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                        "scheduler": scheduler.state_dict(), "epoch": epoch, "history": history,
                        "labels": all_labels, "keep": keep, "config": config, "data_sha256": fingerprint,
                        "average": average, "best": best}
            atomic_write(state_path, lambda f: torch.save(snapshot, f))
    except KeyboardInterrupt:
        bar.close()
        done = history[-1]["epoch"] if history else first_epoch - 1
        if done == 0:
            raise Interrupted(f"interrupted in epoch 1 of {args.epochs}, before anything was saved; run again") \
                from None
        raise Interrupted(f"interrupted: epoch {done} of {args.epochs} is saved in {state_path}; "
                          "continue with the same flags plus --resume") from None
    bar.close()
    elapsed = time.time() - start
    plot_training_curves(history, Path(args.figures) / "training_curves.png")
    chosen = history[-1] if best is None else next(h for h in history if h["epoch"] == best["epoch"])
    final = chosen["dev"]
    summary = {"checkpoint": str(args.out), "config": config, "train_seconds": round(elapsed, 1),
               "history": history, "selected_epoch": chosen["epoch"], "final_dev": final}
    if args.adversarial != "none":
        overfit = catastrophic_overfitting(history)
        summary["adversarial"] = {
            "method": args.adversarial, "epsilon": args.adv_epsilon, "epsilon_scale": "[0, 1] pixels",
            "steps": args.adv_steps if args.adversarial == "pgd" else 1, "step_size": adv_step_size(args),
            "random_start": args.adversarial != "fgsm", "catastrophic_overfitting_epoch": overfit,
            "final_robust": chosen.get("robust"),
        }
    atomic_write(Path(args.figures) / "training.json", lambda f: f.write(json.dumps(summary, indent=1).encode()))
    if best is not None:
        print(f"Kept epoch {chosen['epoch']} (best validation balanced accuracy {best['score']:.4f})")
    print(format_metrics(final))
    print(f"Saved {args.out} ({elapsed:.0f}s of training) and {Path(args.figures) / 'training_curves.png'}")
    return model


def warn_missing_classes(labels, what):
    missing = [name for name, n in zip(CLASSES, class_counts(labels)) if n == 0]
    if missing:
        print(f"warning: the {what} hold no {' or '.join(missing)} images; the model cannot learn to predict "
              f"{'it' if len(missing) == 1 else 'them'}", file=sys.stderr)


def check_repairable(labels, args):
    """Automatic repair needs every class in every fold: refuse up front, not inside scikit-learn."""
    if args.fix_labels != "auto":
        return
    counts = dict(zip(CLASSES, class_counts(labels)))
    short = {name: n for name, n in counts.items() if n < args.repair_folds}
    if short:
        shown = ", ".join(f"{name} {n}" for name, n in short.items())
        raise UserError(f"--fix-labels auto with {args.repair_folds} folds needs at least {args.repair_folds} "
                        f"images of each class, and {args.data} has {shown}; use fewer --repair-folds or "
                        "--fix-labels none")


def main():
    args = parse_args()
    device = pick_device(args.device)
    # Every output is checked before any work: a typo should not surface after label repair.
    check_output_dir(args.figures, "--figures")
    if not args.lr_sweep:
        check_output_file(args.out, "--out")
        check_output_file(resume_path(args.out), "--out")
    if args.fix_labels not in ("auto", "none"):
        read_input_file(args.fix_labels, "label corrections")  # exists and is a regular file
    # The sweep never looks at dev data, so it does not need (or build) it.
    ensure_data(args.data, *([] if args.lr_sweep else [args.dev_data]), cifar_dir=args.cifar_dir)
    train_x, train_y = load_pickle(args.data)
    if args.lr_sweep:
        lr_sweep(train_x, train_y, args, device)
        return
    if not args.resume:
        check_repairable(train_y, args)
        if args.fix_labels not in ("auto", "none"):
            read_corrections(args.fix_labels, len(train_y))
    dev_x, dev_y = load_pickle(args.dev_data)
    with exclusive_lock(args.out, "--out"):
        train(train_x, train_y, dev_x, dev_y, args, device)


if __name__ == "__main__":
    run_main(main)
