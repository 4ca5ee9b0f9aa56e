"""Training on any device: no host sync per step, resume across devices, locks, deterministic mode, --amp.

The tests marked `cuda` or `mps` run only where torch sees that device (they are skipped
elsewhere, CI included): on a machine with a GPU, `python -m pytest -q tests/test_devices.py`
runs them. The rest run on the CPU everywhere.
"""
import collections
import contextlib
import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import cli
import dataset
import devices
import models
import trainer
from conftest import ROOT, DeadlineExceeded, assert_one_error_line, deadline, reaped, run_script
from dataset import load_pickle
from test_trainer import train_cmd

ACCELERATORS = [pytest.param("cuda", marks=pytest.mark.cuda), pytest.param("mps", marks=pytest.mark.mps)]


def weights(path):
    return torch.load(path, weights_only=True)["model_state_dict"]


def identical(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ---------------------------------------------------------------------------
# No host sync per step: reading a value off the device makes the host wait for it


@contextlib.contextmanager
def counted_reads():
    """Count the ways a tensor's value reaches Python (item, tolist, float, int, bool) inside the block."""
    counts = collections.Counter()
    originals = {name: getattr(torch.Tensor, name) for name in ("item", "tolist", "__float__", "__int__", "__bool__")}

    def counting(name, original):
        def read(self, *args, **kwargs):
            counts[name] += 1
            return original(self, *args, **kwargs)
        return read

    for name, original in originals.items():
        setattr(torch.Tensor, name, counting(name, original))
    try:
        yield counts
    finally:
        for name, original in originals.items():
            setattr(torch.Tensor, name, original)


def test_a_default_epoch_reads_its_losses_once_per_chunk_not_once_per_step(default_data, tmp_path):
    args = trainer.parse_args(["--epochs", "1", "--out", str(tmp_path / "m.ckpt"), "--figures", str(tmp_path)])
    train_x, train_y = load_pickle(default_data / "train.pickle")
    dev_x, dev_y = load_pickle(default_data / "dev.pickle")
    epochs = []
    run_epoch = trainer.run_epoch

    def counted_epoch(*a, **k):
        with counted_reads() as counts:
            losses = run_epoch(*a, **k)
        epochs.append((sum(counts.values()), len(losses)))
        return losses

    with pytest.MonkeyPatch.context() as patch, counted_reads() as whole_run:
        patch.setattr(trainer, "run_epoch", counted_epoch)
        trainer.train(train_x, train_y, dev_x, dev_y, args, torch.device("cpu"))
    [(reads, steps)] = epochs
    chunks = -(-steps * 32 // 1024)  # 1,024 images a chunk
    assert steps == 200 and chunks == 7
    # One read of each chunk's losses, plus the sampler's per epoch (its three class counts, its order).
    assert reads <= chunks + 4, reads
    # The whole one-epoch run (scoring, report) read 211 values before: 200 of them one per step.
    assert sum(whole_run.values()) <= 30, whole_run


def test_reads_do_not_grow_with_the_number_of_steps(small_data):
    images, labels = load_pickle(small_data / "train.pickle")
    reads = {}
    for batch in (32, 4):  # 18 and 140 steps, in one chunk of 1,024 images either way
        args = trainer.parse_args(["--batch-size", str(batch), "--fix-labels", "none"])
        model = trainer.new_model(args, images, "cpu", "t")
        optimizer, scheduler = trainer.make_optimizer(model, args, 1000)
        with counted_reads() as counts:
            losses = trainer.run_epoch(model, optimizer, scheduler, images, labels, args,
                                       torch.Generator().manual_seed(0), "cpu")
        reads[batch] = (sum(counts.values()), len(losses))
    assert reads[32][1] == 18 and reads[4][1] == 140
    assert reads[32][0] == reads[4][0] <= 1 + 4, reads


def test_a_loss_that_stops_being_finite_is_still_named_by_its_step(small_data):
    images, labels = load_pickle(small_data / "train.pickle")
    args = trainer.parse_args(["--fix-labels", "none"])
    model = trainer.new_model(args, images, "cpu", "t")
    optimizer, scheduler = trainer.make_optimizer(model, args, 1000)
    calls = []
    forward = model.forward

    def poisoned(x):  # the 5th step's loss is NaN
        calls.append(1)
        out = forward(x)
        return out * float("nan") if len(calls) == 5 else out

    model.forward = poisoned
    losses = []
    with pytest.raises(FloatingPointError, match="loss became nan at step 5 of the epoch"):
        trainer.run_epoch(model, optimizer, scheduler, images, labels, args, torch.Generator().manual_seed(0), "cpu",
                          losses=losses)
    assert len(losses) == 4 and all(v == v for v in losses)  # the finite ones are kept, as before


# ---------------------------------------------------------------------------
# Resume: only what changes the arithmetic is compared



@pytest.fixture(scope="module")
def epoch_1_of_2(small_data, tmp_path_factory):
    """(folder, flags): an uninterrupted 2-epoch run's checkpoint in folder/whole, and in folder/stopped
    the resume state (and checkpoint) of the same run stopped by Ctrl-C during epoch 2."""
    folder = tmp_path_factory.mktemp("epoch_1_of_2")
    flags = ("--epochs", "2", "--fix-labels", "none")
    whole = run_script("trainer.py", *train_cmd(small_data, folder / "whole", *flags)[2:], cwd=folder)
    assert whole.returncode == 0, whole.stderr
    args = trainer.parse_args([*train_cmd(small_data, folder / "stopped", *flags)[2:]])
    run_epoch, calls = trainer.run_epoch, []

    def second_epoch_stops(*a, **k):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return run_epoch(*a, **k)

    with pytest.MonkeyPatch.context() as patch, pytest.raises(cli.Interrupted, match="epoch 1 of 2 is saved"):
        patch.setattr(trainer, "run_epoch", second_epoch_stops)
        trainer.train(*load_pickle(small_data / "train.pickle"), *load_pickle(small_data / "dev.pickle"), args,
                      torch.device("cpu"))
    return folder, flags


def resume_with_state(small_data, epoch_1_of_2, tmp_path, change):
    """Resume the stopped run from its state after change(state), in a copy in tmp_path/run."""
    folder, flags = epoch_1_of_2
    state = torch.load(folder / "stopped" / "m.resume.pt", weights_only=True)
    assert state["epoch"] == 1
    change(state)
    (tmp_path / "run").mkdir()
    torch.save(state, tmp_path / "run" / "m.resume.pt")
    return run_script("trainer.py", *train_cmd(small_data, tmp_path / "run", *flags, "--resume")[2:], cwd=tmp_path)


def test_a_resume_state_with_other_optimizer_implementation_flags_resumes_exactly(small_data, epoch_1_of_2, tmp_path):
    def as_another_device_wrote_it(state):
        group = state["optimizer"]["param_groups"][0]
        assert group["fused"] is True  # as this CPU run wrote it
        # fused as MPS leaves it, foreach set, a flag this torch does not know, one it knows left out.
        group.update(fused=None, foreach=True, a_future_implementation_flag=1)
        del group["differentiable"]

    resumed = resume_with_state(small_data, epoch_1_of_2, tmp_path, as_another_device_wrote_it)
    assert resumed.returncode == 0, resumed.stderr
    assert "after epoch 1 of 2" in resumed.stderr
    # This run's fused kernel took over, so the weights are an uninterrupted run's, bit for bit.
    assert identical(weights(epoch_1_of_2[0] / "whole" / "m.ckpt"), weights(tmp_path / "run" / "m.ckpt"))


@pytest.mark.parametrize("key, value", [("eps", 1e-3), ("amsgrad", True), ("weight_decay", 1)])
def test_a_changed_arithmetic_setting_is_still_refused(small_data, epoch_1_of_2, tmp_path, key, value):
    result = resume_with_state(small_data, epoch_1_of_2, tmp_path,
                               lambda state: state["optimizer"]["param_groups"][0].update({key: value}))
    assert_one_error_line(result, "optimizer param_groups hold other settings than this run's")


def test_a_resume_state_from_before_amp_resumes_as_float32(small_data, epoch_1_of_2, tmp_path):
    resumed = resume_with_state(small_data, epoch_1_of_2, tmp_path, lambda state: state["config"].pop("amp"))
    assert resumed.returncode == 0, resumed.stderr
    assert identical(weights(epoch_1_of_2[0] / "whole" / "m.ckpt"), weights(tmp_path / "run" / "m.ckpt"))


def test_resuming_an_amp_run_without_amp_is_refused(small_data, epoch_1_of_2, tmp_path):
    result = resume_with_state(small_data, epoch_1_of_2, tmp_path, lambda state: state["config"].update(amp=True))
    assert_one_error_line(result, "belongs to a run with other settings (amp True there, False here)")


# ---------------------------------------------------------------------------
# Locks that leave nothing behind; the data built once per data folder


def test_a_run_leaves_no_lock_file_behind(small_data, tmp_path):
    result = run_script("trainer.py", *train_cmd(small_data, tmp_path, "--epochs", "1", "--fix-labels", "none")[2:],
                        cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fig", "m.ckpt", "m.resume.pt"]


def test_a_second_writer_of_the_same_output_is_one_line_while_the_first_holds_it(tmp_path):
    # A second writer that waited for the first instead of stopping would wait here for ever: the deadline fails it.
    with deadline(30, "exclusive_lock"), cli.exclusive_lock(tmp_path / "m.ckpt", "--out"):
        assert (tmp_path / "m.ckpt.lock").exists()
        with pytest.raises(cli.UserError, match=r"--out .*m.ckpt: another run is writing it"):
            with cli.exclusive_lock(tmp_path / "m.ckpt", "--out"):
                pass
    assert not (tmp_path / "m.ckpt.lock").exists()
    with deadline(30, "exclusive_lock"), cli.exclusive_lock(tmp_path / "m.ckpt", "--out"):  # free again
        pass
    assert list(tmp_path.iterdir()) == []


def test_the_deadline_guard_fails_a_lock_wait_that_never_ends(tmp_path):
    # The guard the lock tests rely on: it interrupts a blocking flock in this thread within its time.
    with cli.file_lock(tmp_path / "x.lock", wait=False, busy=lambda: AssertionError("busy")):
        started = time.monotonic()
        with pytest.raises(DeadlineExceeded, match="a deadlock"):
            with deadline(1, "waiting for a held lock"):
                with cli.file_lock(tmp_path / "x.lock", wait=True, busy=None):
                    pytest.fail("two holders of one lock")
        assert time.monotonic() - started < 10


def test_file_lock_admits_one_holder_at_a_time_and_is_removed_after(tmp_path):
    # Separate open() calls contend for flock even within one process: threads stand in for processes,
    # arriving while the file is held, removed and made anew.
    lock, inside, most, entries = tmp_path / "x.lock", [0], [0], []
    guard = threading.Lock()

    def worker(k):
        with cli.file_lock(lock, wait=True, busy=lambda: AssertionError("busy")):
            with guard:
                inside[0] += 1
                most[0] = max(most[0], inside[0])
            entries.append(k)
            time.sleep(0.005)
            with guard:
                inside[0] -= 1

    # Daemon threads and one deadline for all: a deadlocked holder fails the test instead of hanging the run.
    threads = [threading.Thread(target=worker, args=(k,), daemon=True) for k in range(16)]
    for t in threads:  # staggered, so that some arrive after a holder has removed the file
        t.start()
        time.sleep(0.003)
    end = time.monotonic() + 60
    for t in threads:
        t.join(max(0.0, end - time.monotonic()))
    assert not any(t.is_alive() for t in threads), "threads still waiting for the lock after 60 s: a deadlock"
    assert sorted(entries) == list(range(16)) and most[0] == 1
    assert not lock.exists()


BUILD_ONCE = """
import sys, time
from pathlib import Path
sys.path.insert(0, sys.argv[1])
import dataset

def build(source, out_dir):
    with open(Path(sys.argv[2]) / "builds.log", "a") as log:
        log.write("build\\n")
    time.sleep(1.0)  # long enough for the other processes to arrive meanwhile
    for name in ("train.pickle", "dev.pickle"):
        (Path(out_dir) / name).write_bytes(b"built")

dataset.build_from_cifar = build
dataset.ensure_data(dataset.TRAIN_PATH, dataset.DEV_PATH)
"""


def test_processes_sharing_a_data_folder_build_it_once(tmp_path):
    script = tmp_path / "build_once.py"
    script.write_text(BUILD_ONCE)
    with contextlib.ExitStack() as running:  # killed on a timeout: none keeps waiting for the build lock
        procs = [running.enter_context(reaped(subprocess.Popen([sys.executable, str(script), str(ROOT), str(tmp_path)],
                                                               cwd=tmp_path, stderr=subprocess.PIPE, text=True)))
                 for _ in range(3)]
        errors = [p.communicate(timeout=120)[1] for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0], errors
    assert (tmp_path / "builds.log").read_text() == "build\n"
    assert sum("building the default data" in e for e in errors) == 1
    assert sorted(p.name for p in (tmp_path / "data").iterdir()) == ["dev.pickle", "train.pickle"]  # no lock left


# ---------------------------------------------------------------------------
# Deterministic mode and bfloat16 autocast


@pytest.fixture
def deterministic_mode():
    devices.deterministic(torch.device("cpu"))
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(False)
        torch.backends.cudnn.deterministic = False


@pytest.fixture
def torch_switches(monkeypatch):
    """The global switches deterministic() sets, put back afterwards."""
    saved = (torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark,
             torch.are_deterministic_algorithms_enabled())
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    yield
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = saved[:2]
    torch.use_deterministic_algorithms(saved[2])


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_deterministic_mode_sets_every_switch_pytorchs_reproducibility_notes_name(torch_switches, device):
    # PyTorch's notes on reproducibility: cudnn.benchmark = False, cudnn.deterministic = True,
    # torch.use_deterministic_algorithms(True), and on CUDA CUBLAS_WORKSPACE_CONFIG=:4096:8 (or :16:8).
    # Nothing here needs a GPU: the switches are set, not used.
    import os

    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = False, True
    torch.use_deterministic_algorithms(False)
    devices.deterministic(torch.device(device))
    assert torch.backends.cudnn.deterministic is True and torch.backends.cudnn.benchmark is False
    assert torch.are_deterministic_algorithms_enabled() and not torch.is_deterministic_algorithms_warn_only_enabled()
    assert os.environ.get("CUBLAS_WORKSPACE_CONFIG") == (":4096:8" if device == "cuda" else None)


def test_amp_autocasts_to_bfloat16_and_off_changes_nothing():
    # docs/devices.md and --help: --amp is bfloat16 autocast (float32's range: no loss scaling), not float16.
    layer, x = torch.nn.Linear(4, 3), torch.randn(2, 4)
    with devices.autocast(torch.device("cpu"), True):
        assert torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16
        assert layer(x).dtype == torch.bfloat16
    with devices.autocast(torch.device("cpu"), False):
        assert not torch.is_autocast_enabled("cpu") and layer(x).dtype == torch.float32


def test_the_deterministic_pooling_gives_the_same_values_and_gradients_ties_included(deterministic_mode):
    x = torch.randn(8, 16, 3, 3)
    x[:, :4] = x[:, :4].round()  # rounded values tie, and x[:, 4] is all ties
    x[:, 4] = 1.0
    x.requires_grad_(True)
    pooled = models.global_max_pool(x)
    (grad,) = torch.autograd.grad((pooled * torch.arange(16.0)).sum(), x)
    torch.use_deterministic_algorithms(False)
    reference = torch.flatten(F.adaptive_max_pool2d(x, 1), 1)
    (expected,) = torch.autograd.grad((reference * torch.arange(16.0)).sum(), x)
    assert torch.equal(pooled, reference) and torch.equal(grad, expected)
    assert int((grad[:, 4] != 0).sum()) == 8  # each tied map's gradient went to one place


@pytest.mark.parametrize("model", ["simple", "best"])
def test_deterministic_flag_changes_nothing_on_the_cpu(small_data, tmp_path, model):
    # best: WhitenedCNN's global max-pool takes the amax path; without ties its gradients are the pooling's.
    runs = {}
    for name, extra in (("plain", ()), ("deterministic", ("--deterministic",))):
        result = run_script("trainer.py", *train_cmd(small_data, tmp_path / name, "--epochs", "1", "--fix-labels",
                                                     "none", "--model", model, *extra)[2:], cwd=tmp_path)
        assert result.returncode == 0, result.stderr
        runs[name] = weights(tmp_path / name / "m.ckpt")
    assert "deterministic kernels" in result.stderr
    assert identical(runs["plain"], runs["deterministic"])


def test_amp_is_opt_in_named_and_trains_float32_weights(small_data, tmp_path):
    scores = {}
    for name, extra in (("plain", ()), ("amp", ("--amp",))):
        result = run_script("trainer.py", *train_cmd(small_data, tmp_path / name, "--epochs", "4", "--fix-labels",
                                                     "none", *extra)[2:], cwd=tmp_path)
        assert result.returncode == 0, result.stderr
        assert ("bfloat16 autocast (--amp)" in result.stderr) == (name == "amp")
        report = json.loads((tmp_path / name / "fig" / "training.json").read_text())
        assert report["config"]["amp"] is (name == "amp")
        scores[name] = report["final_dev"]["balanced_accuracy"]
    # It computed in bfloat16 (other weights), learned about as much, and kept float32 weights.
    amp, plain = weights(tmp_path / "amp" / "m.ckpt"), weights(tmp_path / "plain" / "m.ckpt")
    assert not identical(amp, plain) and all(v.dtype == torch.float32 for v in amp.values())
    assert scores["amp"] > 0.5 and abs(scores["amp"] - scores["plain"]) < 0.1, scores


def test_warp_is_grid_sample_with_reflection_on_the_cpu():
    g = torch.Generator().manual_seed(0)
    images, grid = torch.rand(4, 3, 32, 32, generator=g), torch.rand(4, 32, 32, 2, generator=g) * 2.4 - 1.2
    expected = F.grid_sample(images, grid, mode="bilinear", padding_mode="reflection", align_corners=False)
    assert torch.equal(devices.warp(images, grid), expected)


def test_draws_on_the_cpu_are_the_epoch_generator_itself():
    g = torch.Generator().manual_seed(5)
    assert devices.draws_on(torch.device("cpu"), g) is g


# ---------------------------------------------------------------------------
# On a GPU: skipped where torch sees none (python -m pytest -q tests/test_devices.py on a GPU machine runs them)


@pytest.fixture(params=ACCELERATORS)
def accelerator(request):
    there = torch.cuda.is_available() if request.param == "cuda" else torch.backends.mps.is_available()
    if not there:
        pytest.skip(f"torch sees no {request.param} device")
    return torch.device(request.param)


def test_training_on_the_device_learns_and_scores_as_on_the_cpu(accelerator, small_data, tmp_path):
    result = run_script("trainer.py", *train_cmd(small_data, tmp_path, "--epochs", "3", "--fix-labels", "none",
                                                 "--device", accelerator.type)[2:], cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert f"device {accelerator.type}" in result.stderr and "on the CPU" not in result.stderr  # no fallback
    for where in ("cpu", accelerator.type):
        tested = run_script("tester.py", "--checkpoint", tmp_path / "m.ckpt", "--data", small_data / "dev.pickle",
                            "--device", where, "--out", tmp_path / where, cwd=tmp_path)
        assert tested.returncode == 0, tested.stderr
    assert json.loads((tmp_path / "cpu" / "metrics_m.json").read_text())["balanced_accuracy"] > 0.45
    # The same checkpoint predicts the same classes on both, but for images at a near tie.
    model, (dev_x, _) = models.load_model(tmp_path / "m.ckpt"), load_pickle(small_data / "dev.pickle")
    on_cpu = models.predict(model, dev_x, "cpu")
    on_device = models.predict(model.to(accelerator), dev_x, accelerator)
    assert (on_cpu == on_device).float().mean() >= 0.98


def test_an_epoch_on_the_device_waits_for_it_once_per_chunk(accelerator, small_data):
    if accelerator.type != "cuda":
        pytest.skip("torch reports synchronizations on CUDA only")
    images, labels = load_pickle(small_data / "train.pickle")
    args = trainer.parse_args(["--batch-size", "4", "--fix-labels", "none", "--mix", "cutmix",
                               "--adversarial", "fgsm-rs"])
    model = trainer.new_model(args, images, accelerator, "t")
    optimizer, scheduler = trainer.make_optimizer(model, args, 1000)
    x, y = images.to(accelerator), labels.to(accelerator)
    torch.cuda.synchronize()
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            losses = trainer.run_epoch(model, optimizer, scheduler, x, y, args, torch.Generator().manual_seed(0),
                                       accelerator)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    syncs = [w for w in caught if "synchroniz" in str(w.message)]
    assert len(losses) == 140 and len(syncs) <= 4, [str(w.message) for w in syncs[:5]]


def test_warp_on_the_device_matches_the_cpu(accelerator):
    g = torch.Generator().manual_seed(0)
    images, grid = torch.rand(4, 3, 32, 32, generator=g), torch.rand(4, 32, 32, 2, generator=g) * 2.4 - 1.2
    on_device = devices.warp(images.to(accelerator), grid.to(accelerator))
    assert on_device.device.type == accelerator.type
    assert torch.allclose(on_device.cpu(), devices.warp(images, grid), atol=1e-5)


def test_amp_trains_on_the_device(accelerator, small_data, tmp_path):
    result = run_script("trainer.py", *train_cmd(small_data, tmp_path, "--epochs", "2", "--fix-labels", "none",
                                                 "--amp", "--model", "best", "--device", accelerator.type)[2:],
                        cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert json.loads((tmp_path / "fig" / "training.json").read_text())["final_dev"]["balanced_accuracy"] > 0.4


@pytest.mark.cuda
def test_deterministic_cuda_runs_repeat_and_resume_exactly(small_data, tmp_path):
    if not torch.cuda.is_available():
        pytest.skip("torch sees no cuda device")
    flags = ("--epochs", "3", "--fix-labels", "none", "--model", "best", "--device", "cuda", "--deterministic")
    for run in ("a", "b"):
        result = run_script("trainer.py", *train_cmd(small_data, tmp_path / run, *flags)[2:], cwd=tmp_path)
        assert result.returncode == 0, result.stderr
    assert identical(weights(tmp_path / "a" / "m.ckpt"), weights(tmp_path / "b" / "m.ckpt"))
    from test_trainer import wait_for

    with reaped(subprocess.Popen(train_cmd(small_data, tmp_path / "c", *flags), stdout=subprocess.DEVNULL,
                                 stderr=subprocess.DEVNULL)) as proc:
        wait_for(tmp_path / "c" / "m.resume.pt")
        proc.kill()
        proc.wait(timeout=60)
    assert torch.load(tmp_path / "c" / "m.resume.pt", weights_only=True)["epoch"] < 3  # killed before the end
    resumed = run_script("trainer.py", *train_cmd(small_data, tmp_path / "c", *flags, "--resume")[2:], cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    assert identical(weights(tmp_path / "a" / "m.ckpt"), weights(tmp_path / "c" / "m.ckpt"))


# ---------------------------------------------------------------------------
# The rest of what devices.py and ddp.py promise, checked where a CPU can


def test_no_copy_in_the_project_is_non_blocking():
    # A non-blocking copy from unpinned memory may read freed memory on MPS (docs/devices.md).
    sources = {p.name: p.read_text() for p in ROOT.glob("*.py")}
    assert [name for name, text in sources.items() if "non_blocking" in text] == []


def test_a_grid_sample_error_off_mps_is_raised_not_worked_around(monkeypatch):
    calls = []

    def fails_once(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("CUDA out of memory (pretend)")
        return F.grid_sample(*args, **kwargs)

    monkeypatch.setattr(devices.F, "grid_sample", fails_once)
    with pytest.raises(RuntimeError, match="pretend"):
        devices.warp(torch.zeros(1, 3, 4, 4), torch.zeros(1, 4, 4, 2))


def test_the_logit_adjustment_is_added_in_float32_under_autocast():
    import treatments

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(64, 3, generator=g) * 3
    targets = torch.randint(0, 3, (64,), generator=g)
    prior = treatments.label_log_prior(torch.tensor([0] * 4600 + [1] * 400 + [2] * 1400))
    expected = F.cross_entropy(logits + 0.5 * prior, targets)
    as_bf16 = treatments.logit_adjusted_cross_entropy(logits.bfloat16(), targets, prior, 0.5)
    assert as_bf16.dtype == torch.float32
    # Only the logits' own rounding to bfloat16 remains, not the sum's.
    reference = F.cross_entropy(logits.bfloat16().float() + 0.5 * prior, targets)
    assert torch.equal(as_bf16, reference) and abs(float(as_bf16 - expected)) < 0.05


def test_amp_is_refused_where_bfloat16_is_only_emulated(monkeypatch):
    monkeypatch.setattr(torch.cuda, "device", lambda device: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: including_emulation)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Tesla T4")
    with pytest.raises(cli.UserError, match=r"^--amp: Tesla T4 has no bfloat16 arithmetic; train without --amp$"):
        devices.check_autocast(torch.device("cuda"))
    import platform

    monkeypatch.setattr(platform, "mac_ver", lambda: ("13.6.1", ("", "", ""), "arm64"))
    with pytest.raises(cli.UserError, match=r"^--amp: MPS computes bfloat16 from macOS 14 on; this is macOS 13.6.1"):
        devices.check_autocast(torch.device("mps"))
    monkeypatch.setattr(platform, "mac_ver", lambda: ("14.5", ("", "", ""), "arm64"))
    devices.check_autocast(torch.device("mps"))
    devices.check_autocast(torch.device("cpu"))


def test_the_process_group_waits_30_minutes_not_nccls_10(monkeypatch):
    import datetime

    import ddp

    joined = {}
    monkeypatch.setattr(torch.distributed, "init_process_group", lambda backend, **kw: joined.update(kw, backend=backend))
    for key, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "2")):
        monkeypatch.setenv(key, value)
    assert ddp.setup("cpu") == torch.device("cpu")
    assert joined == {"backend": "gloo", "timeout": datetime.timedelta(minutes=30), "device_id": None}


def test_a_download_lands_whole_and_is_not_repeated(tmp_path, monkeypatch):
    import torchvision.datasets.utils

    downloads = []

    def fake_download(url, root, filename, md5):
        downloads.append(root)
        batches = Path(root) / "cifar-10-batches-py"
        batches.mkdir()
        for k in range(1, 6):
            (batches / f"data_batch_{k}").write_bytes(b"batch")

    monkeypatch.setattr(torchvision.datasets.utils, "download_and_extract_archive", fake_download)
    first = dataset._download_cifar(tmp_path)
    assert first == tmp_path / "cifar-10-batches-py" and (first / "data_batch_5").read_bytes() == b"batch"
    assert Path(downloads[0]).parent == tmp_path and Path(downloads[0]) != tmp_path  # a folder of its own
    assert dataset._download_cifar(tmp_path) == first and len(downloads) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cifar-10-batches-py"]  # nothing else left
