"""The course's CNN (SimpleModel), a stronger residual CNN, and checkpoint I/O.

SimpleModel checkpoints use the course format, {'model_state_dict': state_dict}, so
course code can read them. Other architectures add an 'arch' key naming themselves;
load_model() reads either, and a bare state_dict too.

The course's API works unchanged: `net = SimpleModel(); net.load(path)` loads the weights
into net (and returns it), `net.save(path)` writes the course format. Every load goes
through read_checkpoint(): torch's weights-only loader (zip checkpoints, after checking the
archive cannot expand past its size and its checksums hold) or the project's own bounded
reader (legacy checkpoints), then an architecture check and a check that every weight is
finite, so a corrupted or diverged file is refused instead of scoring as a real model.
"""
import functools
import io
import pickle
import warnings
import zipfile

import torch
import torch.nn as nn
import torch.nn.functional as F

from cli import UserError, atomic_write, read_input_file
from dataset import Budget, UnsafeFile, rebuild_parameter, read_legacy_torch, tensor_globals


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

    def __init__(self, num_classes=3):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 5)
        self.pool = nn.MaxPool2d(2, 2)
        self.conv2 = nn.Conv2d(16, 16, 5)
        self.fc1 = nn.Linear(16 * 5 * 5, 120)
        self.fc2 = nn.Linear(120, 84)
        self.fc3 = nn.Linear(84, num_classes)
        self.dropout = nn.Dropout(0.5)

    def forward(self, x):
        x = self.pool(F.relu(self.conv1(x)))
        x = self.pool(F.relu(self.conv2(x)))
        x = torch.flatten(x, 1)
        x = self.dropout(F.relu(self.fc1(x)))
        x = self.dropout(F.relu(self.fc2(x)))
        return self.fc3(x)


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
        return self.head(torch.flatten(F.adaptive_max_pool2d(x, 1), 1))


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
        return self.head(torch.flatten(F.adaptive_max_pool2d(x, 1), 1)) / 9


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


def _guess_arch(state):
    return next((name for name, cls in ARCHITECTURES.items() if set(cls().state_dict()) == set(state)), None)


def _describe_mismatch(model, state):
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    shapes = [
        f"{k} {list(state[k].shape)} != {list(v.shape)}"
        for k, v in expected.items()
        if k in state and state[k].shape != v.shape
    ]
    parts = []
    for label, keys in (("missing keys", missing), ("unexpected keys", unexpected), ("mis-shaped", shapes)):
        if keys:
            shown = ", ".join(keys[:4]) + (f" (+{len(keys) - 4} more)" if len(keys) > 4 else "")
            parts.append(f"{label}: {shown}")
    return "; ".join(parts)


def _check_zip(data, path):
    """A zip checkpoint may not expand past its own size, and its checksums must hold.

    torch.save stores entries uncompressed; a compressed entry could inflate without bound
    (a zip bomb), and a CRC mismatch means bytes changed after saving (corruption that would
    otherwise load as garbage weights).
    """
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as archive:
            entries = archive.infolist()
            compressed = [e.filename for e in entries if e.compress_type != zipfile.ZIP_STORED]
            if compressed:
                raise UserError(f"{path}: refused: compressed entries ({compressed[0]}); torch.save never "
                                "compresses, and a compressed entry could expand without bound")
            total = sum(e.file_size for e in entries)
            if total > len(data):
                raise UserError(f"{path}: refused: its entries claim {total:,} bytes but the file holds "
                                f"{len(data):,}")
            bad = archive.testzip()
    except zipfile.BadZipFile as e:
        raise UserError(f"{path}: not a readable PyTorch checkpoint (broken zip archive: {e})") from None
    if bad is not None:
        raise UserError(f"{path}: corrupted: the checksum of {bad} does not match its data")


def _torch_load(data, path):
    """torch.load(weights_only=True) on a checked zip checkpoint, with torch's errors in one line."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the one-line error below already says what went wrong
            return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if "weights only" in str(e).lower() or "unsupported global" in str(e).lower():
            raise UserError(f"{path}: refused: the file holds objects other than tensors, and loading them "
                            "could run code; only weight checkpoints are accepted") from None
        raise UserError(f"{path}: not a readable PyTorch checkpoint (broken pickle)") from None
    except Exception as e:  # torch raises many types for corrupt files
        first = " ".join(str(e).split())[:120] or type(e).__name__
        raise UserError(f"{path}: not a readable PyTorch checkpoint ({first})") from None


def read_torch_file(path, what):
    """The object in a torch.save() zip file, loaded weights-only within the zip checks above."""
    data = read_input_file(path, what)
    if data[:4] != b"PK\x03\x04":
        raise UserError(f"{path}: not a {what} written by torch.save")
    _check_zip(data, path)
    return _torch_load(data, path)


def read_checkpoint(path):
    """(state_dict, arch or None) from a checkpoint file, loaded without running code from it.

    Accepts the course format {'model_state_dict': state}, an 'arch'-tagged dict, or a bare
    state_dict; zip (torch >= 1.6) or legacy serialization.
    """
    data = read_input_file(path, "checkpoint")
    if data[:4] == b"PK\x03\x04":
        _check_zip(data, path)
        ckpt = _torch_load(data, path)
    else:
        try:
            # What a legacy checkpoint may name: tensors, parameters, ordered dicts.
            allowed = {**tensor_globals(Budget(len(data))), ("torch._utils", "rebuild_parameter"): rebuild_parameter}
            ckpt = read_legacy_torch(data, allowed, "checkpoint")
        except UnsafeFile as e:
            if "serialization format" in str(e):
                raise UserError(f"{path}: not a PyTorch checkpoint") from None
            raise UserError(f"{path}: refused: {e}") from None
        except Exception as e:  # broken bytes fail inside unpickling in many ways
            raise UserError(f"{path}: not a readable PyTorch checkpoint ({type(e).__name__})") from None
    if isinstance(ckpt, dict) and "model_state_dict" in ckpt:
        state, arch = ckpt["model_state_dict"], ckpt.get("arch")
    else:
        state, arch = ckpt, None
    if not isinstance(state, dict) or not state or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()
    ):
        raise UserError(f"{path}: expected {{'model_state_dict': state_dict}} or a bare state_dict of tensors")
    if arch is not None and (not isinstance(arch, str) or arch not in ARCHITECTURES):
        raise UserError(f"{path}: unknown architecture {str(arch)[:40]!r} (known: {', '.join(ARCHITECTURES)})")
    return state, arch


def check_state_dict(model, state, where):
    """Refuse a state_dict that does not fit model or holds non-finite or wrongly typed values."""
    mismatch = _describe_mismatch(model, state)
    if mismatch:
        raise UserError(f"{where}: not a {type(model).__name__} checkpoint: {mismatch}")
    for key, expected in model.state_dict().items():
        value = state[key]
        if value.layout != torch.strided or value.is_meta or value.is_quantized:
            raise UserError(f"{where}: tensor {key} is not a plain dense tensor ({value.layout}, {value.device})")
        if expected.is_floating_point():
            if not value.is_floating_point():
                raise UserError(f"{where}: tensor {key} has dtype {value.dtype}, expected floating point")
            if not torch.isfinite(value).all():
                raise UserError(f"{where}: tensor {key} holds NaN or infinite values: the checkpoint is corrupted "
                                "or comes from a diverged run")
        elif value.is_floating_point() or value.is_complex() or value.dtype == torch.bool:
            raise UserError(f"{where}: tensor {key} has dtype {value.dtype}, expected {expected.dtype}")


def load_weights(model, path):
    """Load the checkpoint at path into model (in place) and return model."""
    state, arch = read_checkpoint(path)
    if arch is not None and arch != model.arch:
        raise UserError(f"{path}: holds a {arch!r} model, not a {type(model).__name__} ({model.arch!r})")
    check_state_dict(model, state, path)
    model.load_state_dict(state)
    return model


def load_model(path, map_location="cpu"):
    """The model in a checkpoint (course format, 'arch'-tagged, or a bare state_dict), in eval mode."""
    state, arch = read_checkpoint(path)
    arch = arch or _guess_arch(state) or SimpleModel.arch
    model = ARCHITECTURES[arch]()
    check_state_dict(model, state, path)
    model.load_state_dict(state)
    return model.to(map_location).eval()


@torch.no_grad()
def predict_proba(model, images, device="cpu", batch_size=1000, flip=False):
    """Class probabilities [N, 3] for images [N, 3, 32, 32], in eval mode (dropout off).

    flip=True averages with the horizontally flipped image (test-time augmentation).
    """
    model.eval()
    probs = []
    for start in range(0, len(images), batch_size):
        x = images[start : start + batch_size].to(device, non_blocking=True)
        p = model(x).softmax(1)
        if flip:
            p = (p + model(x.flip(3)).softmax(1)) / 2
        probs.append(p.float().cpu())
    return torch.cat(probs)
