"""What training needs from each device: the CPU, a CUDA GPU, Apple's MPS.

    deterministic(device)         --deterministic: repeatable CUDA runs (cuDNN, cuBLAS, every kernel)
    autocast(device, enabled)     --amp: bfloat16 autocast for forward passes and losses
    draws_on(device, generator)   a generator on the device, seeded from the epoch's CPU generator
    warp(images, grid)            reflection-padded grid_sample, on the CPU only where the device lacks it

The training set goes to the device once per run, with an ordinary (blocking) copy: on MPS
a non-blocking copy from unpinned memory may read its source after it is freed and give
wrong values silently (PyTorch issues 139550 and 189690), and on CUDA one is synchronous
anyway. Every random draw made each step is made on the device from a generator seeded
once per epoch, so no step copies random numbers to the device or waits for it. On the CPU
each of these is the identity: the same generator, the same draws, the same weights.
Which promise of repeatability holds on which device: docs/devices.md.
"""
import contextlib
import os

import torch
import torch.nn.functional as F

from cli import UserError, note_once


def deterministic(device):
    """Make this process's CUDA kernels repeatable: same inputs, same bits, run after run.

    cuDNN picks deterministic convolution algorithms (and no benchmarking, which may pick
    another algorithm per run), cuBLAS a fixed workspace (CUBLAS_WORKSPACE_CONFIG, read when
    cuBLAS starts, so this runs before any CUDA work), and torch raises on any kernel that
    has no deterministic version instead of running it. The one such kernel the models use,
    adaptive_max_pool2d's backward, is replaced by max_pool2d over the whole feature map
    (models.global_max_pool) while this mode is on. On the CPU, runs are repeatable without it.
    """
    if device.type == "cuda":
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False
    torch.use_deterministic_algorithms(True)


def autocast(device, enabled):
    """bfloat16 autocast on device when enabled (the forward pass and the loss; gradients and
    weights stay float32), else a context that does nothing. bfloat16 has float32's range, so
    unlike float16 it needs no loss scaling."""
    if not enabled:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16)


def check_autocast(device):
    """One error line, before any work, where bfloat16 autocast cannot run on device, or only emulated
    (a GPU older than Ampere computes bfloat16 in float32 and slower: no gain to be had)."""
    problem = None
    if not torch.amp.autocast_mode.is_autocast_available(device.type):
        problem = f"this torch has no autocast on {device.type}"
    elif device.type == "cuda":
        with torch.cuda.device(device):
            if not torch.cuda.is_bf16_supported(including_emulation=False):
                problem = f"{torch.cuda.get_device_name(device)} has no bfloat16 arithmetic"
    elif device.type == "mps":
        import platform

        release = platform.mac_ver()[0]
        if release and int(release.split(".")[0]) < 14:
            problem = f"MPS computes bfloat16 from macOS 14 on; this is macOS {release}"
    if problem:
        raise UserError(f"--amp: {problem}; train without --amp")


def draws_on(device, generator):
    """A generator on device for the draws made every step (augmentation, random starts,
    mixing partners), seeded from generator (a CPU generator) with one draw from it.

    On the CPU it is generator itself, so CPU runs draw exactly what they always did. Where
    the device has no generator of its own, it is generator too, and draws are copied over.
    """
    device = torch.device(device)
    if device.type == "cpu":
        return generator
    seed = int(torch.randint(2**62, (1,), generator=generator))
    try:
        return torch.Generator(device).manual_seed(seed)
    except RuntimeError:
        note_once(f"torch has no random generator on {device.type}; random draws are made on the CPU and copied")
        return generator


def rand(shape, generator, device):
    """Uniform [0, 1) numbers of shape on device, drawn from generator where it lives (the device, or the
    CPU and copied); generator None draws from torch's global generator of device."""
    return torch.rand(shape, generator=generator, device=device if generator is None else generator.device).to(device)


_WARPS_ON_CPU = set()  # device types whose grid_sample failed once: they warp on the CPU from then on


def warp(images, grid):
    """Bilinear grid_sample with reflection padding (rotated corners filled with image content).

    Recent torch has it on MPS; where MPS raises for it, this run warps on the CPU from then on
    (one note), since a copy there and back is slower but right.
    """
    def sample(x, g):
        return F.grid_sample(x, g, mode="bilinear", padding_mode="reflection", align_corners=False)

    device = images.device
    if device.type != "mps" or device.type not in _WARPS_ON_CPU:
        try:
            return sample(images, grid)
        except (RuntimeError, NotImplementedError) as e:
            # Only MPS has lacked this kernel; elsewhere (and out of memory anywhere) an error is an error.
            if device.type != "mps" or isinstance(e, torch.OutOfMemoryError):
                raise
            _WARPS_ON_CPU.add(device.type)
            note_once(f"grid_sample with reflection padding failed on {device.type} ({' '.join(str(e).split())[:80]}); "
                      "augmentation warps its images on the CPU")
    return sample(images.cpu(), grid.cpu()).to(device)
