"""Imbalance treatments for trainer.py, each opt-in: the default recipe uses none of them.

    --loss logit-adjusted / balanced-softmax   cross-entropy on logits + tau * log(prior)
    --drw-start EPOCH                           deferred re-balancing: the sampler from EPOCH on
    --mix mixup / cutmix                        each batch mixed with a shuffled copy of itself
    --ema DECAY                                 evaluate and save an average of the weights
    --val-fraction F --select best-val          keep the epoch that scores best on held-out training images

Which of them helped, and by how much, is measured in docs/imbalance_study.md.
"""
import copy
import math
import random

import torch
import torch.nn.functional as F

from cli import float_in, int_in
from dataset import CLASSES, class_counts

# Defaults of the imbalance treatments, for any recipe that does not set them.
TREATMENT_DEFAULTS = dict(loss="ce", tau=1.0, drw_start=0, mix="none", mix_alpha=1.0, ema=0.0)


def add_treatment_args(parser):
    group = parser.add_argument_group("imbalance treatments (defaults per --model recipe)")
    group.add_argument("--loss", choices=("ce", "logit-adjusted", "balanced-softmax"),
                       help="ce: cross-entropy; logit-adjusted: cross-entropy on logits + tau*log(prior) "
                            "(Menon et al. 2021); balanced-softmax: the same with tau 1 (Ren et al. 2020). The "
                            "prior is the class share of the training labels; beside the balanced sampler a small "
                            "tau pushes the model towards the rare classes (default: ce)")
    group.add_argument("--tau", type=float_in(0, 100),
                       help="logit-adjustment strength tau of --loss logit-adjusted (default: 1)")
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
    group.add_argument("--val-fraction", type=float_in(0, 0.5, high_open=True), default=0.0,
                       help="hold out this stratified, seeded share of the training images as a validation "
                            "split, scored every epoch (default: 0)")
    group.add_argument("--select", choices=("last", "best-val"), default="last",
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
    if args.loss == "balanced-softmax" and args.tau != 1.0:
        parser.error(f"--tau {args.tau:g} does not apply to --loss balanced-softmax, which is logit adjustment with "
                     "tau 1; for another tau use --loss logit-adjusted")


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
    shares = torch.tensor(class_counts(labels), dtype=torch.double)
    return (shares / shares.sum()).clamp(min=1e-12).log().float()


def logit_adjusted_cross_entropy(logits, targets, log_prior, tau=1.0, label_smoothing=0.0):
    """Menon et al. (2021): cross-entropy on logits + tau * log(prior).

    The model must outscore the prior of common classes during training, so its raw logits
    (used unchanged at test time) estimate p(x | y) rather than p(y | x): the decision that
    maximizes balanced accuracy.
    """
    # In float32 even under --amp's autocast: a bfloat16 sum would round the adjustment to 3 digits.
    return F.cross_entropy(logits.float() + tau * log_prior.to(logits.device), targets,
                           label_smoothing=label_smoothing)


def mix_batch(x, y, mode, alpha, generator, draws=None):
    """Mixup (Zhang et al. 2018) or CutMix (Yun et al. 2019) within a batch.

    Returns (images, labels, partner labels, lam): the loss is lam * loss(labels) +
    (1 - lam) * loss(partner labels). Every draw comes from `generator` (a CPU generator: lam
    and the box are Python numbers) and the partners' order from `draws` (a generator on the
    batch's device, devices.draws_on; default: generator), so runs repeat; mode "none" returns
    the batch unchanged (lam 1) and draws nothing.
    """
    if mode == "none":
        return x, y, y, 1.0
    # torch.distributions cannot take a generator; Python's Beta sampler seeded from it can.
    lam = random.Random(int(torch.randint(2**62, (1,), generator=generator))).betavariate(alpha, alpha)
    draws = generator if draws is None else draws
    partner = torch.randperm(len(x), generator=draws, device=draws.device).to(x.device)
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


def validation_split(labels, fraction, generator):
    """Stratified, seeded hold-out: (training indices, validation indices), disjoint, sorted.

    Each class (by given label) gives round(fraction * its count) images, at least one when
    fraction > 0, except a class of one image, which stays in training. It depends only on
    (labels, fraction, generator's seed), so a resumed run gets the same split.
    """
    held = []
    for c in range(len(CLASSES)):
        members = (labels == c).nonzero().flatten()
        count = max(1, round(fraction * len(members))) if fraction > 0 and len(members) > 1 else 0
        held.append(members[torch.randperm(len(members), generator=generator)[:count]])
    val = torch.cat(held).sort().values
    is_val = torch.zeros(len(labels), dtype=torch.bool)
    is_val[val] = True
    return (~is_val).nonzero().flatten(), val
