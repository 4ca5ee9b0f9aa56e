"""Adversarial attacks on whole batches, FGSM and PGD, and the adversarial training built on them.

FGSM (Goodfellow et al., 2015) moves every pixel one step of size epsilon in the direction
that raises the loss: x' = x + eps * sign(grad_x loss). PGD (Madry et al., 2018) takes several
such steps, projecting back onto the eps-ball around x after each; FGSM is PGD with one step
of size eps from x itself. One implementation serves the epsilon study (adversarialExample.py:
eval mode, summed loss) and adversarial training (trainer.py --adversarial: train mode, mean
loss, a random start); the mode and the reduction are arguments.

Epsilon is on the [0, 1] pixel scale (8/255 is about 0.031). The model sees images normalized
to [-1, 1] as (x - 0.5) / 0.5, so there the ball's radius is EPS_SCALE * eps = 2 * eps, and
every attacked image is clamped to [-1, 1]: it is still a real image.
"""
import torch
import torch.nn.functional as F

from cli import float_in, int_in
from devices import rand
from images import from_unit
from models import model_mode, predict

# How far one pixel-scale unit reaches in the model's normalized space (2.0 for (x - 0.5) / 0.5):
# taken from from_unit so the two can never disagree.
EPS_SCALE = float(from_unit(torch.tensor(1.0)) - from_unit(torch.tensor(0.0)))


def eps_text(epsilon):
    """8/255 rather than 0.0313725: attack strengths are usually counted in pixel levels."""
    levels = epsilon * 255
    if 0 < epsilon < 0.1 and abs(levels - round(levels)) < 1e-6:
        return f"{round(levels)}/255"
    return f"{epsilon:g}"


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


def _loss_gradient(model, x, delta, labels, reduction):
    """d loss(model(x + delta)) / d delta: the input gradient only, the weights' .grad stay untouched."""
    with torch.enable_grad():
        delta = delta.detach().requires_grad_(True)
        loss = F.cross_entropy(model(x + delta), _label_tensor(labels, x), reduction=reduction)
        (grad,) = torch.autograd.grad(loss, delta)
    return grad


def input_gradient(model, images, labels):
    """d loss / d images for a whole batch (summed loss), without touching the parameters' .grad.

    Summed, not averaged: each image's gradient is then independent of the batch size (a
    mean would shrink it by 1/N and could underflow to 0, and sign(0) = 0).
    """
    return _loss_gradient(model, images.detach(), torch.zeros_like(images), labels, "sum")


def attack_direction(model, images, labels, target=None):
    """The FGSM noise: sign of the loss gradient, or its opposite toward a target class."""
    if target is None:
        return input_gradient(model, images, labels).sign()
    # Targeted: walk *down* the loss of the target label rather than up the loss of the true one.
    return -input_gradient(model, images, target).sign()


def pgd_perturb(model, images, labels, epsilon, steps=10, step_size=None, random_start=False, target=None,
                generator=None, train_mode=False, reduction="sum"):
    """PGD on normalized images [N, 3, 32, 32]: `steps` signed-gradient steps of step_size (default
    eps/4; pixel scale), each projected back onto the eps-ball around the images and into [-1, 1].

    random_start begins at a uniform random point of the ball (drawn from generator, a torch.Generator
    on the CPU or on the images' device; None: torch's global one). target (a class id or [N] tensor) makes the attack targeted: it walks
    down the loss of the target instead of up the loss of the labels. train_mode=False
    attacks the model in eval mode (dropout off), the way it is scored; adversarial training
    passes True, keeping dropout and batch-norm statistics live as Wong et al. and Madry et
    al. do. reduction is the loss's ("sum": every image's gradient independent of the batch;
    training uses "mean", its own loss). The model's mode is restored afterwards.
    """
    x = _fast_layout(images)
    radius = EPS_SCALE * epsilon
    step = EPS_SCALE * (epsilon / 4 if step_size is None else step_size)
    if radius == 0:  # the eps-ball is a point: nothing to search
        return x.clone()
    if random_start:
        delta = (rand(x.shape, generator, x.device) * 2 - 1) * radius
        delta = (x + delta).clamp(-1, 1) - x
    else:
        delta = torch.zeros_like(x)
    goal, sign = (labels, 1) if target is None else (target, -1)
    with model_mode(model, training=train_mode):
        for _ in range(steps):
            grad = _loss_gradient(model, x, delta, goal, reduction)
            delta = (delta + step * sign * grad.sign()).clamp(-radius, radius)
            delta = (x + delta).clamp(-1, 1) - x
    return x + delta


def fgsm_perturb(model, images, labels, epsilon, target=None, step_size=None, train_mode=False, reduction="sum"):
    """FGSM: one step of step_size (default epsilon) from the images themselves, within the eps-ball
    and [-1, 1]; the arguments are pgd_perturb's."""
    return pgd_perturb(model, images, labels, epsilon, steps=1, step_size=epsilon if step_size is None else step_size,
                       target=target, train_mode=train_mode, reduction=reduction)


def attack_success(pred, labels, target=None):
    """Which attacked images the attack broke: misclassified, or (targeted) classified as target."""
    return pred != labels if target is None else pred == target


def attack_predictions(model, attack, images, labels, epsilon, batch_size, device, target=None, restarts=1):
    """Predicted classes [N] (CPU) of the attacked images, attacked batch by batch on device.

    target is None (untargeted) or one class id for every image. With restarts > 1 the attack runs again on the images it has not broken yet, and each
    image keeps a successful result if any run found one: the worst case per image.
    """
    preds = []
    for start in range(0, len(images), batch_size):
        x, y = images[start : start + batch_size].to(device), labels[start : start + batch_size]
        pred = predict(model, attack(model, x, y.to(device), epsilon, target=target), device, len(x))
        for _ in range(restarts - 1):
            still = ~attack_success(pred, y, target)
            if not still.any():
                break
            retry = still.to(device)
            pred[still] = predict(model, attack(model, x[retry], y.to(device)[retry], epsilon, target=target),
                                  device, len(x))
        preds.append(pred)
    return torch.cat(preds)


def transfer_attack(source, attack):
    """An attack crafted on another model (black-box transfer): source's gradients, scored on the target.

    A standard model's adversarial images fooling a defended model more often than that
    model's own gradients do is the classic sign of a masked gradient.
    """
    def perturb(model, images, labels, epsilon, target=None):
        return attack(source, images, labels, epsilon, target=target)

    return perturb


# ---------------------------------------------------------------------------
# Adversarial training (trainer.py --adversarial)


def add_adversarial_args(parser):
    group = parser.add_argument_group("adversarial training")
    group.add_argument("--adversarial", choices=("none", "fgsm-rs", "pgd", "fgsm"), default="none",
                       help="adversarial training: fgsm-rs: FGSM from a random start in the eps-ball, step "
                            "1.25*eps (Wong et al. 2020); pgd: PGD from a random start, --adv-steps steps (Madry "
                            "et al. 2018); fgsm: plain FGSM without random start (prone to catastrophic "
                            "overfitting, for comparison) (default: none)")
    group.add_argument("--adv-epsilon", type=float_in(0, 1, low_open=True), default=8 / 255, metavar="EPS",
                       help="adversarial training radius on the [0, 1] pixel scale, fractions allowed "
                            "(default: 8/255, about 0.031)")
    group.add_argument("--adv-steps", type=int_in(1, 1000), default=7, help="PGD training steps (default: 7)")
    group.add_argument("--adv-step-size", type=float_in(0, 1, low_open=True), metavar="STEP",
                       help="attack step on the pixel scale (default: 1.25*eps for fgsm-rs, eps for fgsm, "
                            "max(eps/4, 2.5*eps/steps) for pgd)")
    group.add_argument("--robust-eval", type=int_in(0, 100_000), default=256, metavar="N",
                       help="with --adversarial: per epoch, FGSM and PGD-10 accuracy at --adv-epsilon on a fixed "
                            "random subset of N dev images (0: off) (default: 256)")


def training_step_size(method, epsilon, steps, step_size=None):
    """The attack step of adversarial training, on the pixel scale."""
    if step_size is not None:
        return step_size
    if method == "fgsm-rs":
        return 1.25 * epsilon  # Wong, Rice & Kolter 2020: 1.25*eps from a uniform start
    if method == "pgd":
        return max(epsilon / 4, 2.5 * epsilon / steps)  # Madry et al.'s 2.5*eps/k
    return epsilon


def adversarial_batch(model, x, y, method, epsilon, steps, step_size, generator):
    """The batch to train on: x itself (method "none"), or x attacked inside the eps-ball.

    fgsm-rs: one step of 1.25*eps from a uniform random start (Wong et al. 2020); pgd: `steps`
    steps from a random start (Madry et al. 2018); fgsm: one step from x, prone to catastrophic
    overfitting. x is the augmented batch, so the attack sees what the model sees; the model
    stays in train mode and the random start comes from the epoch's generator, so runs and
    resumed runs repeat exactly.
    """
    if method == "none":
        return x
    return pgd_perturb(model, x, y, epsilon, steps=steps if method == "pgd" else 1,
                       step_size=training_step_size(method, epsilon, steps, step_size),
                       random_start=method != "fgsm", generator=generator, train_mode=True, reduction="mean")


def robust_accuracy(model, x, y, epsilon, generator):
    """Clean, FGSM and PGD-10 (random start) accuracy of model on x, y (on the model's device) at epsilon.

    Catastrophic overfitting shows here first: FGSM accuracy stays high while PGD
    accuracy collapses to about zero within an epoch.
    """
    def accuracy(images):
        return float((predict(model, images, images.device, len(images)) == y.cpu()).float().mean())

    return {
        "clean": accuracy(x),
        "fgsm": accuracy(fgsm_perturb(model, x, y, epsilon)),
        "pgd": accuracy(pgd_perturb(model, x, y, epsilon, steps=10, random_start=True, generator=generator)),
    }


def overfitting_warning(epoch, robust, method):
    """The line trainer.py prints when catastrophic_overfitting fires in this epoch."""
    advice = "Use --adversarial fgsm-rs or pgd" if method == "fgsm" else \
        "Use --adversarial pgd or a smaller --adv-step-size"
    return (f"warning: catastrophic overfitting in epoch {epoch}: PGD accuracy on the dev subset collapsed to "
            f"{robust['pgd']:.3f} while FGSM accuracy is {robust['fgsm']:.3f}; the model defeats the single-step "
            f"attack only. {advice} or --adv-epsilon")


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
