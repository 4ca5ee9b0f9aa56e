"""Shared fixtures: small real data built from a local CIFAR-10 copy, and a script runner."""
import atexit
import json
import os
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import dataset  # noqa: E402


def cifar_dir():
    """The local CIFAR-10 copy: $CIFAR10_DIR, else ../shared/cifar10-images beside the repo."""
    for candidate in (os.environ.get("CIFAR10_DIR"), ROOT.parent / "shared" / "cifar10-images"):
        if candidate and Path(candidate).is_dir():
            return Path(candidate)
    return None


def pytest_configure(config):
    for device in ("cuda", "mps"):
        config.addinivalue_line("markers", f"{device}: needs a {device} device; skipped where torch sees none")


needs_cifar = pytest.mark.skipif(cifar_dir() is None, reason="no local CIFAR-10 copy (set CIFAR10_DIR)")


class _ScriptRunner:
    """A warm interpreter that forks one child process per script run (tests/script_runner.py)."""

    def __init__(self):
        self.proc, self.lock = None, threading.Lock()

    def start(self):
        self.proc = subprocess.Popen([sys.executable, str(ROOT / "tests" / "script_runner.py")],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                     env={**os.environ, "MPLBACKEND": "Agg"})
        assert json.loads(self.proc.stdout.readline()) == {"ready": True}
        atexit.register(self.proc.kill)

    def run(self, script, args, cwd, env, timeout, memory=None, file_size=None):
        with self.lock, tempfile.TemporaryDirectory() as tmp:
            if self.proc is None or self.proc.poll() is not None:
                self.start()
            request = {"script": str(ROOT / script), "args": [str(a) for a in args], "cwd": str(cwd),
                       "env": env, "timeout": timeout, "memory": memory, "file_size": file_size,
                       "stdout": f"{tmp}/out", "stderr": f"{tmp}/err"}
            self.proc.stdin.write(json.dumps(request) + "\n")
            self.proc.stdin.flush()
            reply = json.loads(self.proc.stdout.readline())
            out, err = (Path(f"{tmp}/{name}").read_text(errors="replace") for name in ("out", "err"))
        if reply["timed_out"]:
            raise subprocess.TimeoutExpired([script, *map(str, args)], timeout, out, err)
        return subprocess.CompletedProcess([script, *map(str, args)], reply["returncode"], out, err)


_runner = _ScriptRunner() if hasattr(os, "fork") else None


def run_script(script, *args, cwd, timeout=600, env=None, memory=None, file_size=None):
    """Run one of the project's scripts as a user would (its own process); return the CompletedProcess.

    memory: address-space limit in bytes; file_size: largest file the run may write.
    """
    full_env = {**os.environ, "MPLBACKEND": "Agg", "PYTHONUNBUFFERED": "1", **(env or {})}
    if _runner is not None:
        return _runner.run(script, args, cwd, full_env, timeout, memory, file_size)
    return subprocess.run(  # no fork() on this platform: a fresh interpreter per run
        [sys.executable, str(ROOT / script), *map(str, args)],
        cwd=cwd, env=full_env, capture_output=True, text=True, timeout=timeout,
    )


def assert_one_error_line(result, *needles):
    """A user mistake: non-zero exit, one stderr line naming the culprit, no traceback."""
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and all(n in lines[0] for n in needles), result.stderr


@pytest.fixture(scope="session")
def small_data(tmp_path_factory):
    """A small course-like set from real CIFAR-10 photos: data/{train,dev}.pickle + manifest."""
    source = cifar_dir()
    if source is None:
        pytest.skip("no local CIFAR-10 copy (set CIFAR10_DIR)")
    out = tmp_path_factory.mktemp("small") / "data"
    dataset.build_from_cifar(
        source, out, seed=1, train_counts=(300, 60, 200), dev_counts=(100, 50, 60), mislabeled=40, quiet=True
    )
    return out


@pytest.fixture(scope="session")
def default_data(tmp_path_factory):
    """The full default data set (4,000/400/2,000 train, 1,000/250/500 dev) from the local copy."""
    source = cifar_dir()
    if source is None:
        pytest.skip("no local CIFAR-10 copy (set CIFAR10_DIR)")
    out = tmp_path_factory.mktemp("default") / "data"
    dataset.build_from_cifar(source, out, quiet=True)
    return out


@pytest.fixture(scope="session")
def briefly_trained(small_data, tmp_path_factory):
    """SimpleModel after 150 class-balanced Adam steps on small_data's training set (a model that
    has learned something, a few seconds to make), in eval mode, and its checkpoint."""
    import torch
    import torch.nn.functional as F

    import models

    torch.manual_seed(0)
    x, y = dataset.load_pickle(small_data / "train.pickle")
    weights = (1.0 / torch.bincount(y, minlength=len(dataset.CLASSES)).float())[y]
    model = models.SimpleModel()
    opt = torch.optim.Adam(model.parameters(), 1e-3)
    for _ in range(150):
        batch = torch.multinomial(weights, 64, replacement=True)
        loss = F.cross_entropy(model(x[batch]), y[batch])
        opt.zero_grad()
        loss.backward()
        opt.step()
    checkpoint = tmp_path_factory.mktemp("briefly_trained") / "briefly.ckpt"
    model.eval().save(checkpoint)
    return model, checkpoint
