"""Shared fixtures: small real data built from a local CIFAR-10 copy, a trained model, and a script runner.

Skips: a user's plain `pytest` without a CIFAR-10 copy skips the integration tests and says so
in its summary. CI (.ci/run) sets REQUIRE_ALL_TESTS=1, under which the missing copy is an
error before any test runs, and any skip is a failure unless the test is marked as needing
what a machine may lack (@pytest.mark.cuda, @pytest.mark.mps: a GPU).
"""
import atexit
import collections
import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import dataset  # noqa: E402

NO_CIFAR = "no local CIFAR-10 copy (set CIFAR10_DIR)"
# CI's switch: every test must run; a skip is allowed only for hardware the machine lacks.
REQUIRE_ALL_TESTS = os.environ.get("REQUIRE_ALL_TESTS", "") not in ("", "0")
MACHINE_MARKERS = {"cuda": "needs a CUDA GPU", "mps": "needs Apple's MPS device"}


def cifar_dir():
    """The local CIFAR-10 copy: $CIFAR10_DIR, else ../shared/cifar10-images beside the repo."""
    for candidate in (os.environ.get("CIFAR10_DIR"), ROOT.parent / "shared" / "cifar10-images"):
        if candidate and Path(candidate).is_dir():
            return Path(candidate)
    return None


needs_cifar = pytest.mark.skipif(cifar_dir() is None, reason=NO_CIFAR)


def pytest_configure(config):
    for name, what in MACHINE_MARKERS.items():
        config.addinivalue_line("markers", f"{name}: {what}; the only tests that may skip under REQUIRE_ALL_TESTS=1")
    if REQUIRE_ALL_TESTS and cifar_dir() is None:
        raise pytest.UsageError(f"REQUIRE_ALL_TESTS=1 and {NO_CIFAR}, or put it at ../shared/cifar10-images: "
                                "the integration tests would be skipped")


def _skip_reason(report):
    reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
    return reason.removeprefix("Skipped: ")


def _allowed_skip(item):
    return any(item.get_closest_marker(name) for name in MACHINE_MARKERS)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if REQUIRE_ALL_TESTS and report.skipped and not _allowed_skip(item) and not hasattr(report, "wasxfail"):
        report.outcome = "failed"
        report.longrepr = f"skipped under REQUIRE_ALL_TESTS=1, where every test must run: {_skip_reason(report)}"


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector):
    outcome = yield
    report = outcome.get_result()
    if REQUIRE_ALL_TESTS and report.skipped:  # a whole module skipped (importorskip at module level)
        report.outcome = "failed"
        report.longrepr = f"module skipped under REQUIRE_ALL_TESTS=1: {_skip_reason(report)}"


def pytest_terminal_summary(terminalreporter):
    """Say in the summary when the integration tests did not run: a plain `pytest` without a
    CIFAR-10 copy passes, and should not look like a full run."""
    skipped = [r for r in terminalreporter.stats.get("skipped", []) if NO_CIFAR in str(r.longrepr)]
    if skipped:
        terminalreporter.write_line(
            f"{len(skipped)} integration tests skipped: {NO_CIFAR}, or put it at ../shared/cifar10-images. "
            "CI (.ci/run, REQUIRE_ALL_TESTS=1) refuses to pass without them.", yellow=True, bold=True)


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


class DeadlineExceeded(BaseException):
    """A block ran past its deadline. A BaseException, like KeyboardInterrupt: the code under test
    catches OSError (TimeoutError is one) and Exception in places, and must not swallow it."""


@contextlib.contextmanager
def deadline(seconds, what):
    """Fail the block with DeadlineExceeded after `seconds` instead of hanging CI (a lock that deadlocks,
    a wait that never ends): SIGALRM interrupts even a blocking flock in the main thread. pytest-timeout
    is not a dependency; where there is no SIGALRM (Windows) the block runs unguarded."""
    if not hasattr(signal, "SIGALRM"):
        yield
        return

    def expired(signum, frame):
        raise DeadlineExceeded(f"{what}: still running after {seconds} s (a deadlock?)")

    previous = signal.signal(signal.SIGALRM, expired)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


@contextlib.contextmanager
def reaped(proc):
    """A started subprocess.Popen, killed and waited for when the block ends however it ends: a failed
    assertion or a timeout must not leave a trainer running, holding its output's lock and a core."""
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate(timeout=60)


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
        pytest.skip(NO_CIFAR)
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
        pytest.skip(NO_CIFAR)
    out = tmp_path_factory.mktemp("default") / "data"
    dataset.build_from_cifar(source, out, quiet=True)
    return out


@pytest.fixture(scope="module")
def one_thread():
    """torch on one thread for a module's tests (pytestmark = pytest.mark.usefixtures("one_thread")):
    their models are small, and on a busy 2-core machine a second OpenMP thread that spins while
    waiting for a core made test_adversarial.py several times slower (34 s vs 5 s)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def softmax_by_hand(model, images, flip=False):
    """The class probabilities tester.py should report, computed here without models.predict:
    the softmax of the model's logits in eval mode, or with flip=True the mean of that softmax and
    the softmax for the mirror image (the width axis, the last one, reversed)."""
    import torch

    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            probs = torch.softmax(model(images), dim=1)
            if flip:
                mirrored = images[..., torch.arange(images.shape[-1] - 1, -1, -1)]
                probs = (probs + torch.softmax(model(mirrored), dim=1)) / 2
    finally:
        model.train(was_training)
    return probs


def fgsm_by_hand(model, images, labels, epsilon, target=None):
    """FGSM written out: one step of 2ε (ε on the [0, 1] scale, images in [-1, 1]) along the sign of
    the summed loss's input gradient (down the target's loss when targeted), clamped to [-1, 1]."""
    import torch
    import torch.nn.functional as F

    model.eval()
    x = images.clone().requires_grad_(True)
    goal = labels if target is None else torch.full_like(labels, target)
    (grad,) = torch.autograd.grad(F.cross_entropy(model(x), goal, reduction="sum"), x)
    step = grad.sign() if target is None else -grad.sign()
    return (images + 2 * epsilon * step).clamp(-1, 1)


TrainedModel = collections.namedtuple("TrainedModel", "model checkpoint dev_x dev_y")


@pytest.fixture(scope="session")
def briefly_trained(small_data, tmp_path_factory):
    """SimpleModel after 250 class-balanced Adam steps on small_data's training set (a model that
    has learned something, a few seconds to make), in eval mode; its checkpoint; small_data's dev set.

    One model for every test that needs a trained one (tester, Grad-CAM, attacks, gradient
    masking): trained once per session, on one thread so that it is the same model whichever
    tests run first.
    """
    import torch
    import torch.nn.functional as F

    import models

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        torch.manual_seed(0)
        x, y = dataset.load_pickle(small_data / "train.pickle")
        weights = (1.0 / torch.bincount(y, minlength=len(dataset.CLASSES)).float())[y]
        model = models.SimpleModel()
        opt = torch.optim.Adam(model.parameters(), 1e-3)
        for _ in range(250):
            batch = torch.multinomial(weights, 64, replacement=True)
            loss = F.cross_entropy(model(x[batch]), y[batch])
            opt.zero_grad()
            loss.backward()
            opt.step()
    finally:
        torch.set_num_threads(threads)
    checkpoint = tmp_path_factory.mktemp("briefly_trained") / "briefly.ckpt"
    model.eval().save(checkpoint)
    dev_x, dev_y = dataset.load_pickle(small_data / "dev.pickle")
    return TrainedModel(model, checkpoint, dev_x, dev_y)
