"""explain.py: Grad-CAM maps from Captum on each architecture's named layer, the model left as it was."""
import sys

import captum.attr  # noqa: F401  requirements.txt: a hard requirement, so its absence fails, never skips
import pytest
import torch
import torch.nn.functional as F

import explain
import models
from cli import UserError
from dataset import load_pickle


@pytest.fixture(scope="module")
def trained(briefly_trained, small_data):
    """A briefly trained SimpleModel and 40 dev images."""
    return briefly_trained[0], load_pickle(small_data / "dev.pickle")[0][:40]


@pytest.mark.parametrize("arch", sorted(models.ARCHITECTURES))
@pytest.mark.parametrize("training", [True, False])
def test_maps_have_the_image_size_and_leave_mode_and_flags_as_they_were(arch, training):
    torch.manual_seed(0)
    model = models.ARCHITECTURES[arch]().train(training)
    first = next(model.parameters())
    first.requires_grad_(False)  # a frozen parameter must stay frozen, the others trainable
    flags = [p.requires_grad for p in model.parameters()]
    assert not all(flags) and any(flags)

    maps = explain.grad_cam(model, torch.randn(5, 3, 32, 32), [0, 1, 2, 0, 1], batch_size=3)
    assert maps.shape == (5, 32, 32) and maps.dtype == torch.float32
    assert (maps >= 0).all()
    assert model.training is training
    assert all(m.training is training for m in model.modules())
    assert [p.requires_grad for p in model.parameters()] == flags
    assert all(p.grad is None for p in model.parameters())  # nothing accumulated into the weights
    assert explain.grad_cam(model, torch.zeros(0, 3, 32, 32), []).shape == (0, 32, 32)


def test_maps_of_a_trained_model_are_not_constant_and_are_grad_cam(trained):
    model, images = trained
    predicted = models.predict(model, images)
    maps = explain.grad_cam(model, images, predicted)
    spread = maps.flatten(1).std(1)
    assert (spread > 0).float().mean() >= 0.9, spread  # a map that says where, for nearly every image
    assert not torch.allclose(maps[0], maps[1])

    # Grad-CAM by hand on conv2, the layer models.py names for SimpleModel: the feature maps
    # weighted by the spatial mean of the predicted logit's gradient, summed, rectified, upsampled.
    assert model.cam_layer == "conv2"
    x = images[:8]
    with torch.enable_grad():
        activation = model.conv2(model.pool(F.relu(model.conv1(x))))
        activation.retain_grad()
        logits = model.fc3(F.relu(model.fc2(F.relu(model.fc1(torch.flatten(model.pool(F.relu(activation)), 1))))))
        logits.gather(1, predicted[:8, None]).sum().backward()
    weights = activation.grad.mean((2, 3), keepdim=True)
    by_hand = F.relu((weights * activation).sum(1, keepdim=True))
    by_hand = F.interpolate(by_hand, size=(32, 32), mode="bilinear", align_corners=False)[:, 0].detach()
    assert torch.allclose(maps[:8], by_hand, atol=1e-6 * by_hand.max().item())


def test_flip_averages_the_map_with_the_mirrored_map_of_the_mirror_image(trained):
    model, images = trained
    x, target = images[:4], models.predict(model, images[:4])
    plain, mirrored = explain.grad_cam(model, x, target), explain.grad_cam(model, x.flip(3), target)
    assert torch.allclose(explain.grad_cam(model, x, target, flip=True), (plain + mirrored.flip(2)) / 2, atol=1e-6)


def test_a_model_without_a_named_layer_is_one_error(trained):
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.Flatten(), torch.nn.Linear(4 * 30 * 30, 3))
    with pytest.raises(UserError, match="cannot explain a Sequential"):
        explain.grad_cam(model, torch.randn(2, 3, 32, 32), [0, 1])


def test_missing_captum_is_one_error_saying_how_to_install_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "captum.attr", None)  # import captum.attr now raises ImportError
    with pytest.raises(UserError, match="--explain needs Captum.*pip install captum"):
        explain.require_captum()
