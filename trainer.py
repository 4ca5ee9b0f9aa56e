"""Train a car/truck/cat classifier on imbalanced, noisy data.

    python trainer.py                                   # default recipe -> checkpoints/trained.ckpt
    python trainer.py --resume                          # continue an interrupted run
    python trainer.py --lr-sweep 1e-5 1e-4 1e-3 1e-2 1e-1 1   # learning-rate study
    python trainer.py --model best                      # the best recipe found
    torchrun --standalone --nproc_per_node=2 trainer.py # the same on two devices (DDP, README)

The recipe: a WeightedRandomSampler draws each class about equally often, and batched
augmentation (flip, rotation/translation, colour jitter) stretches the few trucks and cats.
--fix-labels auto adds label repair (opt-in): labels that are probably wrong (cats labeled
"car") are found with confident learning on out-of-fold predictions and relabeled before
the final training.
"""
import argparse
import contextlib
import hashlib
import math
import sys
import time

import torch
from torch.utils.data import WeightedRandomSampler
from tqdm import tqdm

import ddp
import devices
from attacks import (
    add_adversarial_args, adversarial_batch, catastrophic_overfitting, overfitting_warning, robust_accuracy,
)
from cli import (
    ArgumentParser, Interrupted, UserError, atomic_write, check_output_dir, check_output_file, ctrl_c_after,
    describe, exclusive_lock, float_in, int_in, seed_type,
)
from dataset import DEV_PATH, FIGURES_DIR, TRAIN_PATH, class_counts, ensure_data, load_pickle
from images import to_unit
from label_repair import add_repair_args, check_repairable, read_corrections, repair_labels
from lr_sweep import add_sweep_args, lr_sweep
from metrics import compute_metrics
from models import ARCHITECTURES, build_model, predict, save_checkpoint
from treatments import (
    TREATMENT_DEFAULTS, add_treatment_args, averaged_model, batch_loss, check_treatment_args, ema_decay,
    epoch_sampler, label_log_prior, mix_batch, new_average, update_average, validation_split,
)
from resume_state import RUN_KEYS, check_kept_checkpoint, data_fingerprint, load_resume, restore, resume_path
from training_report import epoch_line, report, run_description, warn_missing_classes
from untrusted import read_input_file

# ---------------------------------------------------------------------------
# The recipe

# Per-architecture defaults. SimpleModel keeps the course's settings: Adam, lr 1e-3, batch 32,
# 60 epochs, with the balanced sampler and augmentation below (on by default for every model).
RECIPES = {
    "simple": dict(epochs=60, lr=1e-3, batch_size=32, optimizer="adam", weight_decay=0.0),
    "resnet8": dict(epochs=30, lr=0.05, batch_size=64, optimizer="sgd", weight_decay=5e-4),
    # The airbench-style net learns fast and then memorizes the trucks: 15 epochs beat 30.
    "whitened": dict(epochs=15, lr=0.05, batch_size=64, optimizer="sgd", weight_decay=5e-4),
    # --model best: the best recipe found (docs/imbalance_study.md), whatever its architecture.
    "best": dict(arch="whitened", epochs=15, lr=0.05, batch_size=64, optimizer="sgd", weight_decay=5e-4,
                 mix="cutmix"),
}
# The fold models of --fix-labels auto, by --repair-model: a recipe and its epochs per fold.
REPAIR_RECIPES = {
    "simple": dict(RECIPES["simple"], repair_epochs=8),
    "best": dict(RECIPES["best"], repair_epochs=10),
}


# ---------------------------------------------------------------------------
# Data: the balanced sampler and batched augmentation


def balanced_weights(labels):
    """Per-sample weight 1 / (count of its class): every class is drawn about equally often."""
    counts = torch.tensor(class_counts(labels)).clamp(min=1).double()
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

    def uniform(low, high, *shape):  # drawn where generator lives: on the device, or on the CPU and copied
        return devices.rand((n, *shape), generator, device) * (high - low) + low

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
    x = devices.warp(images, grid)

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
# Model, optimizer, and one epoch


def derived_seed(seed, *salt):
    # Python's hash() of strings changes between processes; a digest does not.
    return int.from_bytes(hashlib.sha256(repr((seed, *salt)).encode()).digest()[:7], "little")


def seeded(seed, *salt):
    """A generator derived from (seed, salt): each epoch's randomness depends on nothing else,
    so a resumed run draws exactly what the uninterrupted run would have drawn."""
    value = derived_seed(seed, *salt)
    torch.manual_seed(value)  # dropout draws from the global generator
    return torch.Generator().manual_seed(value)


def rank_generator(generator, rank):
    """The generator a rank draws its augmentation, mixing and dropout from, once the epoch's
    shared order is drawn: rank 0 goes on with the epoch's own (one process's exact draws),
    every other rank gets one seeded from the epoch's generator and its rank."""
    if rank == 0:
        return generator
    return seeded(int(torch.randint(2**62, (1,), generator=generator)), "rank", rank)


def new_model(args, images, device, salt):
    """A freshly initialized --model (seeded by salt); data-dependent layers set from images."""
    seeded(args.seed, salt, "init")
    model = build_model(args.arch)
    if hasattr(model, "init_whitening"):
        model.init_whitening(images)
    # Channels-last: oneDNN's convolutions and pooling train SimpleModel faster on CPU (the
    # other architectures are built that way). Checkpoints are saved contiguous.
    return model.to(device, memory_format=torch.channels_last)


def make_optimizer(model, args, steps_total):
    params = [p for p in model.parameters() if p.requires_grad]  # frozen layers (whitening) stay out
    if args.optimizer == "adam":
        # The fused kernel updates all tensors in one call instead of a Python loop over them.
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


def run_epoch(model, optimizer, scheduler, images, labels, args, generator, device, sampler=None, average=None,
              max_steps=None, losses=None):
    """One pass of len(labels) sampled, augmented images; returns the loss of every step
    (appended to `losses` when given, so a caller keeps them if the epoch fails).

    images and labels are best already on device (train and fit put them there once); any
    others are copied there first. sampler overrides args.sampler (deferred re-balancing);
    average, when given, is updated after every step (--ema). Every random draw comes from
    generator, a CPU generator (and dropout's from the global generator seeded with it); the
    draws made every step come from a generator on the device seeded from it (devices.draws_on).
    Raises FloatingPointError when the loss stops being finite.

    The losses are read once per chunk of about 1,024 images, not once per step: reading a
    loss makes the host wait for the device to finish the step, and the next step could not
    be queued meanwhile. A non-finite loss is therefore noticed at the end of its chunk.

    A model in DistributedDataParallel (ddp.wrap) trains on this rank's share of every batch
    of the same order; the other ranks' augmentation, mixing and dropout draw from generators
    of their own (rank_generator).
    """
    model.train()
    raw_model = ddp.unwrap(model)
    rank, world = ddp.place(model)
    images, labels = images.to(device), labels.to(device)
    order = epoch_indices(labels.cpu(), sampler or args.sampler, generator)
    generator = rank_generator(generator, rank)
    draws = devices.draws_on(device, generator)
    log_prior = None if args.loss == "ce" else label_log_prior(labels.cpu()).to(device)
    if max_steps is not None:
        order = order[: max_steps * args.batch_size]
    order = order.to(device)
    losses = [] if losses is None else losses
    # Augment about 1,024 images at a time (whole batches): one big grid_sample beats many small ones.
    chunk = args.batch_size * max(1, 1024 // args.batch_size)
    for start in range(0, len(order), chunk):
        shares = [ddp.shard(batch, rank, world) for batch in order[start : start + chunk].split(args.batch_size)]
        idx = torch.cat([share for share, _ in shares])
        x_chunk, y_chunk = images[idx], labels[idx]
        if args.augment:
            x_chunk = augment_batch(x_chunk, draws)
        b, chunk_losses = 0, []
        for share, weight in shares:
            x, y = x_chunk[b : b + len(share)], y_chunk[b : b + len(share)]
            b += len(share)
            with devices.autocast(device, args.amp):
                # The options, each a no-op by default: attack first, so mixing then mixes attacked images.
                # The attack differentiates the raw module: its backward passes must not start DDP's all-reduce.
                x = adversarial_batch(raw_model, x, y, args.adversarial, args.adv_epsilon, args.adv_steps,
                                      args.adv_step_size, draws)
                x, y, y_partner, lam = mix_batch(x, y, args.mix, args.mix_alpha, generator, draws)
                loss = batch_loss(model(x), y, y_partner, lam, args, log_prior) * weight
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            if average is not None:
                update_average(average, raw_model, ema_decay(args, scheduler.last_epoch))
            chunk_losses.append(loss.detach())
        for value in ddp.step_means(torch.stack(chunk_losses), world):
            if not math.isfinite(value):
                raise FloatingPointError(f"loss became {value} at step {len(losses) + 1} of the epoch")
            losses.append(value)
    return losses


def fit(images, labels, args, device, epochs, salt):
    """Train a fresh model for `epochs` epochs without evaluation or checkpoints (label repair's fold models)."""
    model = new_model(args, images, device, salt)
    images, labels = images.to(device), labels.to(device)  # once, not once per epoch
    optimizer, scheduler = make_optimizer(model, args, epochs * math.ceil(len(labels) / args.batch_size))
    average = new_average(model, args)
    # disable=None: no bar when stderr is not a terminal (log files, CI); the fold's line still prints.
    for epoch in tqdm(range(1, epochs + 1), desc=f"  {salt} epochs", leave=False, file=sys.stderr, disable=None):
        run_epoch(model, optimizer, scheduler, images, labels, args, seeded(args.seed, salt, epoch - 1), device,
                  sampler=epoch_sampler(args, epoch), average=average)
    return averaged_model(model, average)


def fold_trainer(args, device):
    """train_fold(images, labels, name) for label repair: --repair-model's recipe, plain training.

    The fold models follow --repair-model's recipe (SimpleModel by default), whatever --model
    is: k of them must fit in the time budget. No deferred re-balancing: the folds are short.
    They train plainly even when the final model trains adversarially: they only rank labels.
    """
    recipe = {key: value for key, value in REPAIR_RECIPES[args.repair_model].items() if key != "repair_epochs"}
    fold_args = argparse.Namespace(**{**vars(args), "arch": args.repair_model, **TREATMENT_DEFAULTS, **recipe,
                                      "model": args.repair_model, "adversarial": "none"})
    return lambda images, labels, name: fit(images, labels, fold_args, device, args.repair_epochs, name)


# ---------------------------------------------------------------------------
# The run: labels, epochs, per-epoch scores, checkpoints that survive kill -9


def scores(model, images, labels, device):
    return compute_metrics(labels, predict(model, images, device))


def train(train_x, train_y, dev_x, dev_y, args, device):
    state_path = resume_path(args.out)
    fingerprint = data_fingerprint(train_x, train_y)
    ddp.check_same(fingerprint, args.data, "give every process the same file (on every machine) and run again")
    # Rank 0 reads (and checks) the resume state and hands it to the others: they need no copy of the file.
    state = ddp.broadcast(load_resume(state_path, args, fingerprint, train_y) if args.resume and ddp.is_main()
                          else None)
    if state is not None:
        all_labels, keep = state["labels"], state["keep"]
        saved_world = state["config"].get("world_size", 1)
        if type(saved_world) is not int or saved_world != ddp.size():
            print(f"note: {state_path} was trained by {describe(saved_world)} process(es), this run has {ddp.size()}: "
                  "it continues with the same batches and learning rate, but its augmentation draws differ from "
                  "those of an uninterrupted run", file=sys.stderr)
    else:
        try:
            all_labels, keep = repair_labels(train_x, train_y, args, device, fold_trainer(args, device))
        except KeyboardInterrupt:
            raise Interrupted("interrupted during label repair, before training started: nothing was saved; "
                              "run again, or skip repair with --fix-labels none") from None
        all_labels, keep = ddp.broadcast((all_labels, keep))  # every rank trains on rank 0's labels
    if not keep.any():
        raise UserError(f"--fix-labels {args.fix_labels}: drops every training image; nothing left to train on")
    # The validation split is carved from the given labels before anything else, seeded: the same
    # images on every run and resume, never trained on. Its labels are the repaired ones.
    split_generator = torch.Generator().manual_seed(derived_seed(args.seed, "validation"))
    train_idx, val_idx = validation_split(train_y, args.val_fraction, split_generator)
    train_idx, val_idx = train_idx[keep[train_idx]], val_idx[keep[val_idx]]
    images, labels = train_x[train_idx], all_labels[train_idx]
    val_x, val_y = train_x[val_idx], all_labels[val_idx]
    warn_missing_classes(labels, "training labels")

    model = new_model(args, images, device, "main")
    # On the device once: every epoch indexes them there (and the scores run there).
    images, labels, val_x, dev_x = images.to(device), labels.to(device), val_x.to(device), dev_x.to(device)
    steps_per_epoch = math.ceil(len(labels) / args.batch_size)
    optimizer, scheduler = make_optimizer(model, args, args.epochs * steps_per_epoch)
    average = new_average(model, args)
    history, first_epoch, best = [], 1, None
    if state is not None:
        history, first_epoch, average, best = restore(state, state_path, model, optimizer, scheduler, device,
                                                      steps_per_epoch)
        if best is not None and ddp.is_main():
            check_kept_checkpoint(best, args.out, val_x, val_y, device, state_path)
        print(f"Resuming {state_path} after epoch {state['epoch']} of {args.epochs}", file=sys.stderr)
    print(run_description(args, labels, len(val_y), device), file=sys.stderr)
    trained = ddp.wrap(model, device)  # DistributedDataParallel under torchrun; model itself otherwise

    config = {k: getattr(args, k) for k in RUN_KEYS}
    if ddp.size() > 1:
        config["world_size"] = ddp.size()
    robust_x = robust_y = None
    if args.adversarial != "none" and args.robust_eval:
        # A fixed subset, the same every epoch and after a resume, so the numbers compare.
        subset = torch.randperm(len(dev_y), generator=torch.Generator().manual_seed(args.seed))[: args.robust_eval]
        robust_x, robust_y = dev_x[subset].to(device), dev_y[subset].to(device)
    start = time.time()
    # disable=None: no bar when stderr is not a terminal (log files, CI); the epoch lines still print.
    bar = tqdm(range(first_epoch, args.epochs + 1), initial=first_epoch - 1, total=args.epochs,
               desc="epochs", file=sys.stderr, disable=None)
    finished = first_epoch - 1  # the last epoch this process completed (on rank 0: and saved)
    try:
        for epoch in bar:
            try:
                losses = run_epoch(trained, optimizer, scheduler, images, labels, args,
                                   seeded(args.seed, "main", epoch), device, sampler=epoch_sampler(args, epoch),
                                   average=average)
            except FloatingPointError as e:
                # Before the first epoch ends nothing is saved: no state to point to.
                kept = f"the last good state (epoch {finished}) is in {state_path}" if finished else \
                    "nothing was saved"
                raise UserError(f"training diverged in epoch {epoch} ({e}): lower the learning rate "
                                f"(--lr {args.lr:g}); {kept}") from None
            if not ddp.is_main():
                finished = epoch
                continue  # one writer: rank 0 scores, prints and saves; the other ranks hold the same weights
            scored = averaged_model(model, average)
            dev = scores(scored, dev_x, dev_y, device)
            val = scores(scored, val_x, val_y, device) if len(val_y) else None
            history.append({"epoch": epoch, "loss": sum(losses) / len(losses), "dev": dev, "val": val})
            line = epoch_line(epoch, history[-1]["loss"], dev, val)
            if robust_x is not None:
                robust = robust_accuracy(scored, robust_x, robust_y, args.adv_epsilon, seeded(args.seed, "robust", epoch))
                history[-1]["robust"] = robust
                line += f"  |  {len(robust_y)} dev images at eps {args.adv_epsilon:.4g}: clean {robust['clean']:.3f}" \
                        f" fgsm {robust['fgsm']:.3f} pgd {robust['pgd']:.3f}"
            bar.set_postfix(loss=f"{history[-1]['loss']:.3f}", bal=f"{dev['balanced_accuracy']:.3f}")
            tqdm.write(line, file=sys.stderr)
            if catastrophic_overfitting(history) == epoch:
                tqdm.write(overfitting_warning(epoch, history[-1]["robust"], args.adversarial), file=sys.stderr)
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
            # A Ctrl-C that lands after the rename but before `finished` is set would say the state is
            # one epoch older than the one on disk (or that nothing was saved): it waits for both.
            with ctrl_c_after():
                atomic_write(state_path, lambda f: torch.save(snapshot, f))
                finished = epoch
    except KeyboardInterrupt:
        bar.close()
        if not ddp.is_main():  # its line goes to torchrun's report; rank 0's says what was saved
            raise Interrupted(f"interrupted after epoch {finished} of {args.epochs}; rank 0 writes the resume "
                              f"state, {state_path}") from None
        if finished == 0:
            raise Interrupted(f"interrupted in epoch 1 of {args.epochs}, before anything was saved; run again") \
                from None
        raise Interrupted(f"interrupted: epoch {finished} of {args.epochs} is saved in {state_path}; "
                          "continue with the same flags plus --resume") from None
    bar.close()
    if ddp.is_main():
        report(history, best, config, time.time() - start, args)
    return model


# ---------------------------------------------------------------------------
# Command line


def parse_args(argv=None):
    parser = ArgumentParser(description=__doc__)
    parser.add_argument("--data", default=TRAIN_PATH, help=f"training pickle (default: {TRAIN_PATH})")
    parser.add_argument("--dev-data", default=DEV_PATH, help=f"dev pickle for per-epoch scores (default: {DEV_PATH})")
    parser.add_argument("--cifar-dir", help="local CIFAR-10 copy used if the default data must be built")
    parser.add_argument("--model", default="simple", choices=sorted({*ARCHITECTURES, "best"}),
                        help="architecture, or best: the best recipe (default: simple)")
    parser.add_argument("--epochs", type=int_in(1, 100_000),
                        help="epochs (default: 60 simple, 30 resnet8, 15 whitened and best)")
    parser.add_argument("--lr", type=float_in(0, math.inf, low_open=True),
                        help="peak learning rate (default: 1e-3 Adam for simple, 0.05 SGD for the others)")
    parser.add_argument("--batch-size", type=int_in(1, 65536),
                        help="batch size (default: 32 for simple, 64 for the others)")
    parser.add_argument("--optimizer", choices=("adam", "sgd"), help="optimizer (default: per model)")
    parser.add_argument("--weight-decay", type=float_in(0, 1), help="weight decay (default: per model)")
    parser.add_argument("--schedule", choices=("constant", "cosine", "onecycle"), default="onecycle",
                        help="learning-rate schedule (default: onecycle)")
    parser.add_argument("--label-smoothing", type=float_in(0, 1, high_open=True), default=0.0,
                        help="cross-entropy label smoothing (default: 0)")
    parser.add_argument("--sampler", choices=("balanced", "sqrt", "none"), default="balanced",
                        help="balanced: WeightedRandomSampler, weight 1/class count; sqrt: weight "
                             "1/sqrt(class count); none: plain shuffling (default: balanced)")
    parser.add_argument("--augment", action=argparse.BooleanOptionalAction, default=True,
                        help="random flip, rotation/translation and colour jitter (default: on)")
    parser.add_argument("--out", default="checkpoints/trained.ckpt",
                        help="checkpoint path (default: checkpoints/trained.ckpt)")
    parser.add_argument("--figures", default=FIGURES_DIR, help="folder for figures and JSON reports (default: figures)")
    parser.add_argument("--resume", action="store_true", help="continue from the resume state next to --out")
    parser.add_argument("--seed", type=seed_type, default=0,
                        help="random seed, 0 to 2**32-1; CPU runs are repeatable (default: 0)")
    parser.add_argument("--device", default="auto",
                        help="cpu, cuda, cuda:N, mps or auto: CUDA, else MPS, else the CPU (default: auto); under "
                             "torchrun each process takes the CUDA device of its local rank")
    parser.add_argument("--amp", action="store_true",
                        help="bfloat16 autocast for the training steps' forward passes; weights, optimizer and the "
                             "reported scores stay float32 (default: off, float32 throughout)")
    parser.add_argument("--deterministic", action="store_true",
                        help="repeatable CUDA runs: deterministic cuDNN, cuBLAS and kernels, at some speed (CPU runs "
                             "repeat without it; docs/devices.md)")
    add_repair_args(parser, sorted(REPAIR_RECIPES))
    add_treatment_args(parser)
    add_adversarial_args(parser)
    add_sweep_args(parser)
    args = parser.parse_args(argv)
    recipe = {"arch": args.model, **TREATMENT_DEFAULTS, **RECIPES[args.model]}
    for key, value in recipe.items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    if args.repair_epochs is None:
        args.repair_epochs = REPAIR_RECIPES[args.repair_model]["repair_epochs"]
    check_treatment_args(parser, args)
    return args


def sweep_runs(images, labels, args, device):
    """start_run(lr) for lr_sweep: the same initialization for every rate, a constant rate, --sweep-steps steps."""
    placed = images.to(device), labels.to(device)  # once, for every rate

    def start_run(lr):
        run_args = argparse.Namespace(**{**vars(args), "lr": lr, "schedule": "constant"})
        model = new_model(args, images, device, "sweep")
        optimizer, scheduler = make_optimizer(model, run_args, args.sweep_steps)
        generator = seeded(args.seed, "sweep")
        return lambda losses, max_steps: run_epoch(model, optimizer, scheduler, *placed, run_args, generator, device,
                                                   max_steps=max_steps, losses=losses)

    return start_run


def main():
    args = parse_args()
    device = ddp.setup(args.device)  # under torchrun also the process group; a world of one otherwise
    if args.lr_sweep and ddp.size() > 1:
        raise UserError("--lr-sweep compares learning rates in short runs of one process each: run it with "
                        "python trainer.py, not torchrun")
    if args.deterministic:
        devices.deterministic(device)  # before any computation: cuBLAS reads its setting when it starts
    if args.amp:
        devices.check_autocast(device)
    # Every output is checked before any work: a typo should not surface after label repair.
    check_output_dir(args.figures, "--figures", create=False)  # made when written: a refused run leaves none
    if not args.lr_sweep:
        check_output_file(args.out, "--out")
        check_output_file(resume_path(args.out), "--out")
    if args.fix_labels not in ("auto", "none"):
        read_input_file(args.fix_labels, "label corrections")  # exists and is a regular file
    # The sweep never looks at dev data, so it does not need (or build) it. Each machine's first
    # process builds it (and says so) while the machine's others wait; machines that share a data
    # folder take turns under ensure_data's lock.
    with ddp.local_main_first():
        ensure_data(args.data, *([] if args.lr_sweep else [args.dev_data]), cifar_dir=args.cifar_dir)
    train_x, train_y = load_pickle(args.data)
    if args.lr_sweep:
        lr_sweep(args.lr_sweep, args.sweep_steps, sweep_runs(train_x, train_y, args, device), args.figures)
        return
    if not args.resume:
        check_repairable(train_y, args)
        if args.fix_labels not in ("auto", "none"):
            read_corrections(args.fix_labels, len(train_y))
    dev_x, dev_y = load_pickle(args.dev_data)
    with exclusive_lock(args.out, "--out") if ddp.is_main() else contextlib.nullcontext():  # the writer's lock
        train(train_x, train_y, dev_x, dev_y, args, device)


if __name__ == "__main__":
    ddp.run_main(main)
