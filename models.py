"""The networks, their checkpoints, and prediction.

    SimpleModel   the course's CNN
    ResNet8       a small residual batch-norm CNN
    WhitenedCNN   an airbench-style CNN with a frozen patch-whitening first layer

SimpleModel checkpoints use the course format, {'model_state_dict': state_dict}, so
course code can read them. Other architectures add an 'arch' key naming themselves.
Loading reads the weights where common training code keeps them too (checkpoint_weights):
a bare state_dict, or one under 'state_dict' or 'model' beside an optimizer's state and
the like, its keys prefixed by a wrapper (DataParallel's 'module.', torch.compile's
'_orig_mod.') or not; a note says which layout it read, unless it is the course's.

The course's API works unchanged: `net = SimpleModel(); net.load(path)` loads the weights
into net (and returns it), `net.save(path)` writes the course format. Every load goes
through untrusted.read_checkpoint (no code runs, nothing runs away) and
untrusted.check_state_dict (the architecture fits and every weight is finite), so a
corrupted or diverged file is refused instead of scoring as a real model.
"""
import contextlib
import functools

import torch
import torch.nn as nn
import torch.nn.functional as F

from cli import UserError, atomic_write, clip, describe, note_once
from untrusted import check_state_dict, read_checkpoint


class _LoadMethod:
    """`net.load(path)` loads the checkpoint into net and returns net: the course's API, which
    leaves net's train/eval mode as it was. `SimpleModel.load(path)` returns a new model in
    eval mode, and `SimpleModel.load(net, path)` loads into net. No call leaves random weights.
    """

    def __get__(self, instance, owner):
        if instance is not None:
            return functools.partial(load_weights, instance)

        def load(model_or_path, path=None):
            if isinstance(model_or_path, nn.Module):
                return load_weights(model_or_path, path)
            return load_weights(owner(), model_or_path).eval()

        return load


class Checkpointed(nn.Module):
    """save(path) and load(path) for every architecture, in the course's style."""

    load = _LoadMethod()

    def save(self, path):
        save_checkpoint(self, path)


class SimpleModel(Checkpointed):
    """The course's CNN; parameter names are part of the checkpoint format."""

    arch = "simple"
    cam_layer = "conv2"  # the last convolution (10x10), read by Grad-CAM (explain.py)

    def __init__(self, num_classes=3):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 5)
        self.pool = nn.MaxPool2d(2, 2)
        self.conv2 = nn.Conv2d(16, 16, 5)
        self.fc1 = nn.Linear(16 * 5 * 5, 120)
        self.fc2 = nn.Linear(120, 84)
        self.fc3 = nn.Linear(84, num_classes)
        self.dropout1 = nn.Dropout(0.5)
        self.dropout2 = nn.Dropout(0.5)

    def forward(self, x):
        x = self.pool(F.relu(self.conv1(x)))
        x = self.pool(F.relu(self.conv2(x)))
        # As the course's x.view(-1, 16 * 5 * 5): one unbatched image [3, 32, 32] gives [1, 3]. reshape,
        # not view, because the trainer runs this network in channels-last layout.
        x = x.reshape(-1, 16 * 5 * 5)
        x = self.dropout1(F.relu(self.fc1(x)))
        x = self.dropout2(F.relu(self.fc2(x)))
        return self.fc3(x)


def global_max_pool(x):
    """[N, C, H, W] -> [N, C]: each channel's largest value.

    adaptive_max_pool2d has no deterministic backward on CUDA, so under deterministic mode
    (trainer.py --deterministic) it is a max_pool2d whose window is the whole map: its backward is
    deterministic, and it computes the same values and gradients (ties included: both give the
    gradient to the first largest value), at about twice the pooling's small cost on a CPU.
    """
    if torch.are_deterministic_algorithms_enabled():
        return torch.flatten(F.max_pool2d(x, x.shape[-2:]), 1)
    return torch.flatten(F.adaptive_max_pool2d(x, 1), 1)


def _conv_bn(c_in, c_out):
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True))


class _Residual(nn.Module):
    def __init__(self, channels):
        super().__init__()
        self.body = nn.Sequential(_conv_bn(channels, channels), _conv_bn(channels, channels))

    def forward(self, x):
        return x + self.body(x)


class ResNet8(Checkpointed):
    """A small residual batch-norm CNN for 32x32 inputs on a CPU budget.

    ResNet-9 layout (prep conv, then pool-as-you-go stages with residual blocks at
    two of them), narrowed so a 2-core CPU trains it on the course data in minutes.
    """

    arch = "resnet8"
    cam_layer = "layer3"  # the last convolutional block, after its residual sum (4x4), read by Grad-CAM

    def __init__(self, num_classes=3, width=24):
        super().__init__()
        w = width
        self.prep = _conv_bn(3, w)
        self.layer1 = nn.Sequential(_conv_bn(w, 2 * w), nn.MaxPool2d(2), _Residual(2 * w))
        self.layer2 = nn.Sequential(_conv_bn(2 * w, 4 * w), nn.MaxPool2d(2))
        self.layer3 = nn.Sequential(_conv_bn(4 * w, 8 * w), nn.MaxPool2d(2), _Residual(8 * w))
        self.head = nn.Linear(8 * w, num_classes)

    def forward(self, x):
        x = self.layer3(self.layer2(self.layer1(self.prep(x))))
        return self.head(global_max_pool(x))


class _FrozenScaleBatchNorm(nn.BatchNorm2d):
    """Batch norm with its scale fixed at 1 and only the shift learned (as in airbench): the
    following convolution can absorb any scale, and one parameter less per channel trains
    faster. The running statistics keep PyTorch's momentum 0.1: airbench's 0.4 averages over
    too few of our 64-image batches, and the last batches then swung the final model's
    truck accuracy by several points from one epoch to the next."""

    def __init__(self, channels):
        super().__init__(channels, eps=1e-12)
        self.weight.requires_grad_(False)


class _ConvGroup(nn.Module):
    """conv, max-pool, BN, GELU, conv, BN, GELU: airbench's block (pooling before the norm
    makes the first norm and activation four times cheaper)."""

    def __init__(self, c_in, c_out):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, padding=1, bias=False)
        self.pool = nn.MaxPool2d(2)
        self.norm1 = _FrozenScaleBatchNorm(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1, bias=False)
        self.norm2 = _FrozenScaleBatchNorm(c_out)
        for conv in (self.conv1, self.conv2):
            # Identity ("Dirac") initialization of the first c_in filters: every block starts
            # as an implicit residual connection, which a plain (non-residual) stack needs.
            torch.nn.init.dirac_(conv.weight.data[: conv.in_channels])

    def forward(self, x):
        x = F.gelu(self.norm1(self.pool(self.conv1(x))))
        return F.gelu(self.norm2(self.conv2(x)))


class WhitenedCNN(Checkpointed):
    """An airbench-style network (Keller Jordan's airbench94), narrowed for a 2-core CPU.

    The first layer is a frozen 2x2 convolution whose filters are the eigenvectors of the
    training images' 2x2 patch covariance, scaled by 1/sqrt(eigenvalue) and used with both
    signs: it decorrelates (whitens) the pixels, which lets the rest train at a high learning
    rate from the first step. Its weights are set from data by init_whitening() (the trainer
    calls it before training; a checkpoint stores them like any other weight). Then three
    conv groups, a global max-pool and a linear head whose output is scaled down by 1/9
    (small initial logits).
    """

    arch = "whitened"
    cam_layer = "layer3"  # the last conv group (3x3), read by Grad-CAM (explain.py)

    def __init__(self, num_classes=3, widths=(32, 96, 192)):
        super().__init__()
        self.whiten = nn.Conv2d(3, 24, 2, bias=True)  # 2 signs x 12 eigenvectors of 3x2x2 patches
        self.whiten.weight.requires_grad_(False)
        self.layer1 = _ConvGroup(24, widths[0])
        self.layer2 = _ConvGroup(widths[0], widths[1])
        self.layer3 = _ConvGroup(widths[1], widths[2])
        self.head = nn.Linear(widths[2], num_classes, bias=False)

    @torch.no_grad()
    def init_whitening(self, images, eps=5e-4):
        """Set the frozen first layer from images [N, 3, 32, 32] (the training data)."""
        covariance, count = torch.zeros(12, 12, dtype=torch.float64), 0
        for chunk in images.split(500):  # chunks: all 2x2 patches of 6,400 images would take 300 MB
            patches = chunk.float().unfold(2, 2, 1).unfold(3, 2, 1).permute(0, 2, 3, 1, 4, 5).reshape(-1, 12)
            covariance += (patches.T @ patches).double()
            count += len(patches)
        eigenvalues, eigenvectors = torch.linalg.eigh(covariance / count)
        filters = (eigenvectors.T / (eigenvalues[:, None] + eps).sqrt()).reshape(12, 3, 2, 2)
        self.whiten.weight.copy_(torch.cat([filters, -filters]))
        self.whiten.bias.zero_()

    def forward(self, x):
        x = F.gelu(self.whiten(x))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.head(global_max_pool(x)) / 9


ARCHITECTURES = {cls.arch: cls for cls in (SimpleModel, ResNet8, WhitenedCNN)}


def build_model(arch="simple"):
    try:
        model = ARCHITECTURES[arch]()
    except KeyError:
        raise UserError(f"unknown model {arch!r}; choose one of {', '.join(ARCHITECTURES)}") from None
    if arch != SimpleModel.arch:
        # oneDNN's convolutions run about 1.3x faster in channels-last layout on CPU (measured
        # for ResNet8). SimpleModel stays contiguous here, so that scoring a course checkpoint
        # computes exactly what a course evaluation loop does; the trainer converts it.
        model = model.to(memory_format=torch.channels_last)
    return model


def checkpoint_dict(model):
    """The dict saved for model: course format for SimpleModel, plus 'arch' otherwise."""
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    if model.arch == SimpleModel.arch:
        return {"model_state_dict": state}
    return {"model_state_dict": state, "arch": model.arch}


def save_checkpoint(model, path):
    """Write model's checkpoint atomically (temporary file, then rename)."""
    ckpt = checkpoint_dict(model)
    atomic_write(path, lambda f: torch.save(ckpt, f))


# Where training code keeps the weights in a checkpoint dict, looked for in this order: the course's
# key (also PyTorch's tutorial on checkpoints), 'state_dict' (Lightning and many training loops),
# 'model' (torchvision's reference scripts).
WEIGHT_KEYS = ("model_state_dict", "state_dict", "model")
# What a wrapper puts before every key of the state_dict it saves, and how many wrappers are stripped at
# most (DistributedDataParallel around a compiled model is two; each strip copies every key).
WRAPPER_PREFIXES = {"module.": "DataParallel, DistributedDataParallel", "_orig_mod.": "torch.compile"}
MAX_WRAPPERS = 4


def _is_state_dict(value):
    return isinstance(value, dict) and bool(value) and all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in value.items())


def _names(keys, shown=4):
    keys = list(keys)
    names = ", ".join(repr(clip(k)) if isinstance(k, str) else describe(k) for k in keys[:shown])
    return names + (f" and {len(keys) - shown:,} more" if len(keys) > shown else "")


def _without_wrapper_prefixes(state, path):
    """(state, prefixes stripped): each wrapper's prefix stripped when every key carries it. A prefix on
    only some keys is refused: no wrapper writes that, so the keys are not one model's."""
    stripped = []
    while len(stripped) < MAX_WRAPPERS:
        prefix = next((p for p in WRAPPER_PREFIXES if any(k.startswith(p) for k in state)), None)
        if prefix is None:
            break
        other = next((k for k in state if not k.startswith(prefix)), None)
        if other is not None:
            carrying = sum(k.startswith(prefix) for k in state)
            raise UserError(f"{path}: {carrying:,} of the state_dict's {len(state):,} keys start with {prefix!r} and the "
                            f"others do not (such as {clip(other)!r}); a wrapper ({WRAPPER_PREFIXES[prefix]}) puts it "
                            "on every key, so these are not one model's weights: save them again with "
                            "torch.save(model.state_dict(), path)")
        state = {k[len(prefix):]: v for k, v in state.items()}
        stripped.append(prefix)
    return state, stripped


def checkpoint_weights(ckpt, path, architectures):
    """(state_dict, arch or None, note or None): the weights in a loaded checkpoint and the layout they
    were read from, where the course and common training code keep them. The note names the layout
    (None for the course's own, {'model_state_dict': state} with 'arch' or not); arch, when present,
    must be one of architectures."""
    arch, left_out = None, []
    if _is_state_dict(ckpt):
        state, where = ckpt, "a bare state_dict"
    elif isinstance(ckpt, dict) and any(k in ckpt for k in WEIGHT_KEYS):
        key = next(k for k in WEIGHT_KEYS if k in ckpt)
        state, where, arch = ckpt[key], repr(key), ckpt.get("arch")
        if not _is_state_dict(state):
            raise UserError(f"{path}: {key!r} holds {describe(state)}, not a state_dict (names and tensors)")
        left_out = [k for k in ckpt if k not in (key, "arch")]
    else:
        found = f"a dict with the keys {_names(ckpt)}" if isinstance(ckpt, dict) and ckpt else describe(ckpt)
        raise UserError(f"{path}: found no weights: expected a state_dict (names and tensors), bare or under "
                        f"{', '.join(map(repr, WEIGHT_KEYS[:-1]))} or {WEIGHT_KEYS[-1]!r}, but the file holds {found}")
    if arch is not None and (not isinstance(arch, str) or arch not in architectures):
        raise UserError(f"{path}: unknown architecture {describe(arch)} (known: {', '.join(architectures)})")
    state, stripped = _without_wrapper_prefixes(state, path)
    details = [f"{' and '.join(stripped)} prefix{'es' if len(stripped) > 1 else ''} stripped"] if stripped else []
    if left_out:
        details.append(f"left out: {_names(left_out)}")
    if where == repr(WEIGHT_KEYS[0]) and not details:
        return state, arch, None
    return state, arch, f"{path}: read the weights from {where}" + (f" ({'; '.join(details)})" if details else "")


def read_weights(path):
    """(state_dict, arch or None, note or None) from the checkpoint at path, loaded without running code
    from it, wherever it keeps them (checkpoint_weights)."""
    return checkpoint_weights(read_checkpoint(path), path, ARCHITECTURES)


def _guess_arch(state):
    return next((name for name, cls in ARCHITECTURES.items() if set(cls().state_dict()) == set(state)), None)


def _load_checked(model, state, note, path):
    """Load state into model once it fits; only then say which layout it came from (a refusal is one line)."""
    check_state_dict(model, state, path)
    model.load_state_dict(state)
    if note:
        note_once(note)
    return model


def load_weights(model, path):
    """Load the checkpoint at path into model (in place) and return model."""
    state, arch, note = read_weights(path)
    if arch is not None and arch != model.arch:
        raise UserError(f"{path}: holds a {arch!r} model, not a {type(model).__name__} ({model.arch!r}); "
                        "models.load_model(path) builds the model a checkpoint names")
    return _load_checked(model, state, note, path)


def load_model(path, map_location="cpu"):
    """The model in a checkpoint (any layout checkpoint_weights reads), in eval mode."""
    state, arch, note = read_weights(path)
    model = ARCHITECTURES[arch or _guess_arch(state) or SimpleModel.arch]()
    return _load_checked(model, state, note, path).to(map_location).eval()


@contextlib.contextmanager
def model_mode(model, training=False):
    """model in eval mode (dropout off, batch-norm statistics frozen) or, with training=True, in
    train mode inside the block; the caller's mode is restored afterwards."""
    was_training = model.training
    model.train(training)
    try:
        yield model
    finally:
        model.train(was_training)


@torch.no_grad()
def predict(model, images, device="cpu", batch_size=1000, flip=False, probabilities=False, both=False):
    """The model's predictions for images [N, 3, 32, 32], in eval mode, batch by batch (model on device).

    Returns predicted labels [N] (the argmax of the logits: what any evaluation loop computes),
    or with probabilities=True the softmax [N, classes], or with both=True (labels,
    probabilities) from the same forward passes; all on the CPU. flip=True averages the
    probabilities with those of the horizontally flipped images (test-time augmentation), and
    the labels are their argmax. The model's train/eval mode is restored afterwards.
    """
    labels, probs = [], []
    with model_mode(model, training=False):
        for start in range(0, len(images), batch_size):
            x = images[start : start + batch_size].to(device)
            logits = model(x)
            p = logits.softmax(1)
            if flip:
                p = (p + model(x.flip(3)).softmax(1)) / 2
            labels.append((p if flip else logits).argmax(1).cpu())
            probs.append(p.float().cpu())
    labels, probs = torch.cat(labels), torch.cat(probs)
    return (labels, probs) if both else probs if probabilities else labels
