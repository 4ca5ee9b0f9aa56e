"""The default recipe the README promises, pinned: its settings, its schedule, and the bounds of its
augmentation, each measured against an oracle written here rather than read from trainer.py."""
import json
import math

import pytest
import torch

import adversarialExample as adv
import lr_sweep
import models
import tester
import trainer
from images import from_unit, to_unit
from models import SimpleModel

# README: "The default recipe keeps the course's settings (SimpleModel, Adam, lr 1e-3, batch 32,
# 60 epochs)", a balanced sampler, augmentation on, label repair opt-in, a one-cycle schedule
# peaking at 1e-3.
COURSE = dict(arch="simple", optimizer="adam", lr=1e-3, batch_size=32, epochs=60, weight_decay=0.0)


def test_default_recipe_is_the_courses_settings_plus_sampler_and_augmentation():
    args = trainer.parse_args([])
    assert {key: getattr(args, key) for key in COURSE} == COURSE
    assert args.model == "simple"
    assert (args.schedule, args.sampler, args.augment, args.fix_labels) == ("onecycle", "balanced", True, "none")
    # Every option is off by default ("Options, each a call into its own module and off by default").
    assert (args.loss, args.mix, args.ema, args.drw_start, args.val_fraction, args.select) == \
        ("ce", "none", 0.0, 0, 0.0, "last")
    assert (args.adversarial, args.label_smoothing, args.lr_sweep, args.resume, args.seed) == ("none", 0.0, None,
                                                                                                 False, 0)
    # float32 throughout, torch's own kernels (docs/devices.md): both are opt-in.
    assert (args.amp, args.deterministic) == (False, False)
    assert (args.out, args.figures) == ("checkpoints/trained.ckpt", "figures")


def test_model_best_recipe_is_the_whitened_network_for_15_epochs_with_cutmix():
    # README: "--model best  # the best recipe this project has (WhitenedCNN, 15 epochs, cutmix)".
    args = trainer.parse_args(["--model", "best"])
    assert (args.arch, args.epochs, args.mix) == ("whitened", 15, "cutmix")
    # Flags still win over a recipe's values.
    assert trainer.parse_args(["--model", "best", "--epochs", "3", "--lr", "0.01"]).epochs == 3


def test_the_other_documented_defaults():
    # docs/imbalance_study.md: --model resnet8 is "SGD + Nesterov, weight decay 5e-4, one-cycle to lr
    # 0.05, batch 64, 30 epochs".
    resnet = trainer.parse_args(["--model", "resnet8"])
    assert (resnet.arch, resnet.optimizer, resnet.weight_decay, resnet.lr, resnet.batch_size, resnet.epochs,
            resnet.schedule) == ("resnet8", "sgd", 5e-4, 0.05, 64, 30, "onecycle")
    optimizer, _ = trainer.make_optimizer(models.ResNet8(), resnet, 10)
    assert type(optimizer) is torch.optim.SGD and optimizer.defaults["nesterov"] and optimizer.defaults["momentum"] > 0
    # Label repair (README, docs/label_repair.md): 4 folds of SimpleModel, 8 epochs a fold; --repair-model
    # best: 10 epochs a fold; relabel, one-way pairs only.
    repair = trainer.parse_args(["--fix-labels", "auto"])
    assert (repair.repair_folds, repair.repair_model, repair.repair_epochs, repair.repair_action,
            repair.repair_pairs) == (4, "simple", 8, "relabel", "directional")
    assert trainer.parse_args(["--fix-labels", "auto", "--repair-model", "best"]).repair_epochs == 10
    # Adversarial training (docs/robustness.md): ε 8/255, 7 PGD steps, 256 dev images scored each epoch.
    adversarial = trainer.parse_args(["--adversarial", "fgsm-rs"])
    assert (adversarial.adv_epsilon, adversarial.adv_steps, adversarial.robust_eval) == (pytest.approx(8 / 255), 7, 256)
    # adversarialExample.py (README): FGSM on checkpoints/trained.ckpt and dev data at the table's 8 ε,
    # PGD-10 with --attack pgd, one start unless --restarts; 0.03 for the drawn examples.
    attack = adv.parse_args([])
    assert (attack.checkpoint, attack.data, attack.attack, attack.steps, attack.restarts, attack.random_start,
            attack.step_size, attack.target) == ("checkpoints/trained.ckpt", "data/dev.pickle", "fgsm", 10, 1, False,
                                                  None, None)
    assert attack.epsilons == [0, 0.01, 0.02, 0.03, 0.05, 0.1, 0.2, 0.3] and attack.example_epsilon == 0.03
    # tester.py (README, docs/mistakes.md): the shipped model on dev, no TTA, the 24 highest-loss mistakes.
    test = tester.parse_args([])
    assert (test.checkpoint, test.data, test.tta, test.explain, test.out) == (
        "checkpoints/pre_trained.ckpt", "data/dev.pickle", "none", False, "figures")
    assert (test.mistakes if test.mistakes is not None else tester.DEFAULT_MISTAKES) == 24


def one_cycle_by_hand(step, total, peak, warmup_share=0.15, start_div=25.0, final_div=1e4):
    """Smith's one-cycle with cosine annealing, as the README's recipe names it: from peak/25 up to the
    peak over the first 15 % of the steps, then down to peak/25/1e4 at the last step, each half a
    cosine."""
    start, end = peak / start_div, peak / start_div / final_div
    top = warmup_share * total - 1  # the step at which the peak is reached
    if step <= top:
        low, high, t = start, peak, step / top
    else:
        low, high, t = end, peak, (step - top) / (total - 1 - top)
        t = 1 - t
    return low + (high - low) * (1 - math.cos(math.pi * t)) / 2


def test_schedule_optimizer_and_batch_size_of_the_default_recipe():
    args = trainer.parse_args([])
    model = SimpleModel()
    total = 400
    optimizer, scheduler = trainer.make_optimizer(model, args, total)
    assert type(optimizer) is torch.optim.Adam
    group = optimizer.param_groups[0]
    assert group["weight_decay"] == 0 and len(optimizer.param_groups) == 1
    assert sum(len(g["params"]) for g in optimizer.param_groups) == len(list(model.parameters()))
    rates = []
    for _ in range(total):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    expected = [one_cycle_by_hand(step, total, 1e-3) for step in range(total)]
    assert rates == pytest.approx(expected, rel=1e-6, abs=1e-12)
    assert max(rates) == pytest.approx(1e-3) and rates.index(max(rates)) == 59  # the peak at 15 % of the steps


def test_an_epoch_of_the_default_recipe_samples_balanced_augments_and_steps_per_batch_of_32(monkeypatch):
    args = trainer.parse_args([])
    images = torch.rand(100, 3, 32, 32) * 2 - 1
    labels = torch.tensor([0] * 80 + [1] * 5 + [2] * 15)
    seen, samplers, augmented = [], [], []
    real_indices, real_augment = trainer.epoch_indices, trainer.augment_batch
    monkeypatch.setattr(trainer, "epoch_indices", lambda y, sampler, g: samplers.append(sampler) or
                        real_indices(y, sampler, g))
    monkeypatch.setattr(trainer, "augment_batch", lambda x, g, **kw: augmented.append(len(x)) or
                        real_augment(x, g, **kw))
    model = SimpleModel()
    model.register_forward_hook(lambda module, inputs, output: seen.append(len(inputs[0])))
    optimizer, scheduler = trainer.make_optimizer(model, args, 4)
    losses = trainer.run_epoch(model, optimizer, scheduler, images, labels, args, torch.Generator().manual_seed(0), "cpu")
    assert seen == [32, 32, 32, 4] and len(losses) == 4 and scheduler.last_epoch == 4
    assert samplers == ["balanced"] and augmented == [100]


def test_the_square_root_sampler_draws_classes_in_proportion_to_the_root_of_their_counts():
    # --sampler sqrt: per-image weight 1 / sqrt(count), so class c is drawn in proportion to sqrt(count_c).
    counts = [4600, 400, 1400]
    labels = torch.cat([torch.full((n,), c) for c, n in enumerate(counts)])
    order = trainer.epoch_indices(labels, "sqrt", torch.Generator().manual_seed(0))
    share = torch.bincount(labels[order], minlength=3).double() / len(order)
    roots = torch.tensor(counts, dtype=torch.double).sqrt()
    assert share.tolist() == pytest.approx((roots / roots.sum()).tolist(), abs=0.02)
    assert trainer.sampler_weights(labels, "sqrt")[[0, 4600, 5000]].tolist() == pytest.approx(
        [1 / math.sqrt(n) for n in counts])


# ---------------------------------------------------------------------------
# Augmentation: "random flip, rotation (±10°), translation (±10 %) and colour jitter (±20 %),
# drawn per image". Each is measured on synthetic images whose answer is known, with the
# function's defaults (what training uses), so that every bound is seen reached and never passed.

N = 1500


def augmented(images, seed=0):
    return trainer.augment_batch(images, torch.Generator().manual_seed(seed))


def test_augmentation_brightness_stays_within_20_percent_and_reaches_it():
    # A flat grey image: geometry cannot change it, contrast and saturation have nothing to act on,
    # so each output is the grey level times the brightness factor.
    grey = from_unit(torch.full((N, 3, 32, 32), 0.5))
    out = to_unit(augmented(grey))
    factor = out.mean((1, 2, 3)) / 0.5
    assert out.flatten(1).std(1).max() < 1e-5  # one factor per image, the same for every pixel
    assert factor.min() >= 0.8 - 1e-4 and factor.max() <= 1.2 + 1e-4, (factor.min(), factor.max())
    assert factor.min() < 0.81 and factor.max() > 1.19, (factor.min(), factor.max())
    assert factor.std() > 0.1  # spread over the range (uniform: 0.115), not bunched at the ends


def luma(rgb):
    """ITU-R BT.601 luma, the grey of colour jitter's saturation and contrast steps."""
    return 0.299 * rgb[:, 0] + 0.587 * rgb[:, 1] + 0.114 * rgb[:, 2]


def test_augmentation_contrast_and_saturation_stay_within_20_percent_each():
    # A flat colour: the grey level scales by the brightness b, the colour's distance from its
    # grey by b * contrast * saturation, each factor within ±20 %.
    colour = torch.tensor([0.65, 0.35, 0.5])
    image = from_unit(colour[None, :, None, None].expand(N, 3, 32, 32).clone())
    out = to_unit(augmented(image, seed=1)).mean((2, 3))
    brightness = luma(out) / luma(colour[None])
    chroma = (out[:, 0] - out[:, 1]) / (colour[0] - colour[1]) / brightness
    assert brightness.min() >= 0.8 - 2e-3 and brightness.max() <= 1.2 + 2e-3
    assert chroma.min() >= 0.8 ** 2 - 5e-3 and chroma.max() <= 1.2 ** 2 + 5e-3, (chroma.min(), chroma.max())
    assert chroma.min() < 0.70 and chroma.max() > 1.36, (chroma.min(), chroma.max())


def two_spots(n):
    """Grey images with a bright spot (left) and a fainter one (right), 14 pixels apart about the
    centre: where the augmentation moves them says how it turned, shifted and mirrored the image."""
    ys, xs = torch.meshgrid(torch.arange(32.0), torch.arange(32.0), indexing="ij")
    spot = lambda x0, amplitude: amplitude * torch.exp(-((xs - x0) ** 2 + (ys - 15.5) ** 2) / 2)  # noqa: E731
    unit = 0.5 + spot(8.5, 0.25) + spot(22.5, 0.12)
    return from_unit(unit.expand(n, 3, 32, 32).clone())


def spot_centres(images):
    """Centres (x, y in pixels) of the brighter and the fainter spot: signal-weighted means around each peak."""
    unit = to_unit(images).mean(1)
    signal = (unit - unit.flatten(1).median(1).values[:, None, None]).clamp(min=0)  # the background is most pixels
    ys, xs = torch.meshgrid(torch.arange(32.0), torch.arange(32.0), indexing="ij")
    centres = []
    for _ in range(2):
        peak = signal.flatten(1).argmax(1)
        px, py = (peak % 32).float()[:, None, None], (peak // 32).float()[:, None, None]
        near = ((xs - px) ** 2 + (ys - py) ** 2) <= 12
        weight = signal * near
        centres.append(torch.stack([(weight * xs).sum((1, 2)), (weight * ys).sum((1, 2))], 1) / weight.sum((1, 2))[:, None])
        signal = signal * (((xs - px) ** 2 + (ys - py) ** 2) > 30)  # remove the first spot, find the second
    return centres


def test_augmentation_rotation_shift_and_flip_stay_within_their_bounds_and_reach_them():
    source = two_spots(N)
    bright, faint = spot_centres(augmented(source, seed=2))
    before_bright, before_faint = spot_centres(source[:1])
    assert before_bright[0].tolist() == pytest.approx([8.5, 15.5], abs=0.05)  # the measurement itself
    assert before_faint[0].tolist() == pytest.approx([22.5, 15.5], abs=0.05)

    # Mirrored: the bright spot ends up on the right. About half the images.
    mirrored = bright[:, 0] > faint[:, 0]
    assert 0.4 < mirrored.float().mean() < 0.6
    # Rotation: the angle of the line between the spots (after undoing the mirror).
    direction = faint - bright
    direction[mirrored, 0] *= -1
    degrees = torch.rad2deg(torch.atan2(direction[:, 1], direction[:, 0]))
    assert (direction.norm(dim=1) - 14).abs().max() < 0.3  # turned and moved, never scaled
    assert degrees.abs().max() <= 10.3, degrees.abs().max()
    assert degrees.abs().max() > 9.5 and (degrees.abs() > 5).float().mean() > 0.4  # uniform over ±10°
    # Shift: where the centre between the spots went, in the image's own axes before the turn
    # and the mirror (the order augment_batch's sampling grid applies them in does not matter
    # for a bound on each axis), as a share of the 32-pixel side.
    middle = (bright + faint) / 2 - 15.5
    theta = torch.deg2rad(degrees)
    x = torch.where(mirrored, -middle[:, 0], middle[:, 0])
    shift = torch.stack([x * theta.cos() + middle[:, 1] * theta.sin(), -x * theta.sin() + middle[:, 1] * theta.cos()], 1)
    share = shift.abs() / 32
    assert share.max() <= 0.103, share.max()
    assert share[:, 0].max() > 0.097 and share[:, 1].max() > 0.097, share.max(0)
    assert (share > 0.05).float().mean() > 0.4  # uniform over ±10 % on each axis


# ---------------------------------------------------------------------------
# The learning-rate study: "a run whose loss becomes NaN or explodes past 10x its first value is
# marked diverged at the step it happened" (lr_sweep.py's contract, the README's "0.1 and 1 diverge")


def test_lr_sweep_marks_a_run_diverged_where_its_loss_explodes_or_stops_being_finite(tmp_path, capsys):
    scripts = {1e-3: [2.0, 1.8, 1.5, 1.2, 1.0, 0.9],  # learns
               0.1: [2.0, 3.0, 19.0, 21.0, 4.0, 2.0],  # past 10x the first loss at step 4, then back: diverged
               1.0: [2.0, 2.5]}  # then a NaN at step 3

    def start_run(lr):
        def run(losses, max_steps):
            for value in scripts[lr][:max_steps]:
                losses.append(value)
            if lr == 1.0:
                raise FloatingPointError("loss became nan")
        return run

    results = {r["lr"]: r for r in lr_sweep.lr_sweep(list(scripts), 6, start_run, tmp_path)}
    assert json.loads((tmp_path / "lr_sweep.json").read_text()) == list(results.values())
    assert not results[1e-3]["diverged"] and results[1e-3]["losses"] == scripts[1e-3]
    assert results[1e-3]["final_loss"] == pytest.approx(sum(scripts[1e-3]) / 6)
    assert results[0.1]["diverged"] and results[0.1]["losses"] == [2.0, 3.0, 19.0, 21.0]
    assert results[0.1]["why"] == "loss exploded to 21 at step 4"
    assert results[1.0]["diverged"] and results[1.0]["why"] == "loss became NaN or infinite at step 3"
    printed = capsys.readouterr().out
    assert "lr 0.1      diverged: loss exploded to 21 at step 4" in printed and "lr 0.001    final loss 1.400" in printed
