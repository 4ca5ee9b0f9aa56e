"""What the model looks at: Grad-CAM maps from Captum, upsampled to the image (tester.py --explain).

    grad_cam(model, images, targets, device)   maps [N, 32, 32], one per image, for the given classes

Grad-CAM (Selvaraju et al. 2017) weighs each feature map of a convolutional layer by the mean
gradient of the target class's logit over that map, sums the weighted maps and keeps the
positive part: where the layer saw evidence *for* the class. The layer is each
architecture's `cam_layer` (models.py names it, once per network), the output of its last
convolutional block; its coarse map (10x10 for SimpleModel, 4x4 for ResNet8, 3x3 for WhitenedCNN) is
upsampled bilinearly to 32x32.

Captum is imported only here, and this module only when --explain is given: plain
tester.py never needs it. Captum computes from the model in memory and loads nothing.
"""
import contextlib

import torch

from cli import UserError, one_line
from models import model_mode

INSTALL_HINT = "install it with `pip install captum` (see requirements.txt)"


def require_captum():
    """Captum's LayerGradCam, or one UserError line saying how to install it."""
    try:
        from captum.attr import LayerGradCam
    except ImportError as e:
        raise UserError(f"--explain needs Captum, which cannot be imported ({e}); {INSTALL_HINT}") from None
    return LayerGradCam


def cam_layer(model):
    """The module Grad-CAM reads for model: its architecture's cam_layer."""
    name = getattr(model, "cam_layer", None)
    try:
        return model.get_submodule(name)
    except (AttributeError, TypeError):
        raise UserError(f"--explain: cannot explain a {type(model).__name__}: it names no convolutional layer for "
                        "Grad-CAM (cam_layer)") from None


@contextlib.contextmanager
def _frozen(model):
    """Parameters without gradients inside the block (Grad-CAM needs only the layer's), each
    parameter's requires_grad flag restored afterwards, frozen ones staying frozen."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    try:
        for p, _ in flags:
            p.requires_grad_(False)
        yield model
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


def grad_cam(model, images, targets, device="cpu", batch_size=250, flip=False):
    """Grad-CAM maps [N, H, W] (on the CPU, >= 0) of images [N, 3, H, W] for the classes targets [N].

    The model runs in eval mode (as it predicts), on device; its train/eval mode and every
    parameter's requires_grad flag are as before afterwards. flip=True (test-time
    augmentation) averages the map of each image with the mirrored map of its mirror image,
    as the prediction averages the two. A map of zeros means the layer held no evidence for
    the class. Captum failing on a model is one UserError line.
    """
    LayerGradCam = require_captum()
    from captum.attr import LayerAttribution

    layer = cam_layer(model)
    targets = torch.as_tensor(targets, dtype=torch.long)
    if len(targets) != len(images):
        raise ValueError(f"{len(images)} images but {len(targets)} targets")
    explainer = LayerGradCam(model, layer)
    maps = []
    with model_mode(model, training=False), _frozen(model), torch.enable_grad():
        for start in range(0, len(images), batch_size):
            x = images[start : start + batch_size].to(device)
            target = targets[start : start + batch_size].to(device)
            views = [(x, False), (x.flip(3), True)] if flip else [(x, False)]
            batch = 0
            for view, mirrored in views:
                try:
                    coarse = explainer.attribute(view, target=target, relu_attributions=True)
                except Exception as e:  # Captum's own error about a model it cannot hook
                    raise UserError(f"--explain: Captum cannot compute Grad-CAM for this "
                                    f"{type(model).__name__} ({one_line(e, 200)})") from None
                fine = LayerAttribution.interpolate(coarse.detach().float(), tuple(x.shape[-2:]), "bilinear")
                batch = batch + (fine.flip(3) if mirrored else fine)
            maps.append((batch / len(views)).clamp_min(0)[:, 0].cpu())
    return torch.cat(maps) if maps else torch.zeros(0, *images.shape[-2:])
