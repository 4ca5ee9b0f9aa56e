"""trainer.py on more than one device: torchrun + DDP (gloo on the CPU), and the choice of device."""
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import cli
import ddp
import trainer
from cli import UserError
from conftest import ROOT, run_script
from test_trainer import wait_for

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
ONE_THREAD = {**os.environ, "OMP_NUM_THREADS": "1", "MPLBACKEND": "Agg", "PYTHONUNBUFFERED": "1"}


def trainer_args(small_data, out, *flags):
    return [str(ROOT / "trainer.py"), "--data", str(small_data / "train.pickle"), "--dev-data",
            str(small_data / "dev.pickle"), "--out", str(out / "m.ckpt"), "--figures", str(out / "fig"), *flags]


def torchrun(small_data, out, *flags):
    return subprocess.run([*TORCHRUN, *trainer_args(small_data, out, *flags)], capture_output=True, text=True,
                          env=ONE_THREAD, timeout=600)


def weights(path):
    return torch.load(path, weights_only=True)["model_state_dict"]


def error_lines(stderr):
    return [line for line in stderr.splitlines() if line.startswith("trainer.py: error:")]


# ---------------------------------------------------------------------------
# The pieces, in one process


@pytest.mark.parametrize("world", [1, 2, 3])
@pytest.mark.parametrize("batch_size", [32, 7])
def test_shards_cover_the_epoch_in_order_and_weigh_to_the_batch_mean(world, batch_size):
    labels = torch.cat([torch.zeros(300), torch.ones(60), torch.full((200,), 2)]).long()
    order = trainer.epoch_indices(labels, "balanced", torch.Generator().manual_seed(0))[:101]  # a short last batch
    per_image_loss = torch.rand(len(labels), dtype=torch.float64)
    for batch in order.split(batch_size):
        shares = [ddp.shard(batch, rank, world) for rank in range(world)]
        # Each position of the epoch's order goes to exactly one rank (the order repeats images: it is
        # drawn with replacement), in order; a rank left without an image trains on one of weight 0.
        assert torch.equal(torch.cat([share for share, weight in shares if weight > 0]), batch)
        assert all(len(share) >= 1 for share, _ in shares)
        assert max(len(s) for s, w in shares if w) - min(len(s) for s, w in shares if w) <= 1
        # DDP averages the ranks' gradients: the weighted share means average to the batch mean.
        combined = sum(weight * per_image_loss[share].mean() for share, weight in shares) / world
        assert combined.item() == pytest.approx(per_image_loss[batch].mean().item(), rel=1e-12)


def test_a_world_of_one_makes_no_process_group(monkeypatch):
    for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE"):
        monkeypatch.delenv(key, raising=False)
    assert ddp.setup("cpu") == torch.device("cpu")
    assert not torch.distributed.is_initialized()
    assert (ddp.rank(), ddp.size(), ddp.is_main()) == (0, 1, True)
    assert ddp.spread(lambda k: k * k, range(5)) == [0, 1, 4, 9, 16]
    model = torch.nn.Linear(2, 2)
    assert ddp.wrap(model, torch.device("cpu")) is model and ddp.place(model) == (0, 1)
    batch = torch.arange(10)
    share, weight = ddp.shard(batch, 0, 1)
    assert torch.equal(share, batch) and weight == 1.0


@pytest.fixture
def devices(monkeypatch):
    """Pretend which accelerators torch sees: devices(cuda=..., mps=...)."""
    def pretend(cuda=False, mps=False):
        monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: 2 if cuda else 0)
        monkeypatch.setattr(torch.backends.mps, "is_available", lambda: mps)
    return pretend


def test_auto_picks_cuda_then_mps_then_cpu(devices):
    devices(cuda=True, mps=True)
    assert cli.pick_device("auto") == torch.device("cuda")
    devices(cuda=False, mps=True)
    assert cli.pick_device("auto") == torch.device("mps") == cli.pick_device(None)
    assert cli.pick_device("mps") == torch.device("mps")
    devices(cuda=False, mps=False)
    assert cli.pick_device("auto") == torch.device("cpu")


@pytest.mark.parametrize("name, needle", [("mps", "no MPS device"), ("mps:0", "expected cpu, cuda, cuda:N, mps"),
                                          ("cuda", "no CUDA"), ("cpu:0", "expected")])
def test_a_device_that_is_not_there_is_one_clear_error(devices, name, needle):
    devices(cuda=False, mps=False)
    with pytest.raises(UserError, match=needle):
        cli.pick_device(name)


@pytest.mark.parametrize("name, needle", [("mps", "on mps train with one process"), ("cuda:1", "local rank")])
def test_torchrun_refuses_devices_it_cannot_share(devices, monkeypatch, name, needle):
    devices(cuda=True, mps=True)
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(UserError, match=needle):
        ddp.setup(name)
    assert not torch.distributed.is_initialized()


# ---------------------------------------------------------------------------
# torchrun --standalone --nproc_per_node=2 trainer.py, on small real data


def test_each_process_trains_on_its_share_of_the_one_process_epoch(tmp_path):
    result = subprocess.run([*TORCHRUN, ROOT / "tests" / "distributed_epoch.py", tmp_path / "epoch.json"],
                            capture_output=True, text=True, env=ONE_THREAD, timeout=300)
    assert result.returncode == 0, result.stderr
    run = json.loads((tmp_path / "epoch.json").read_text())
    batches = [run["order"][b : b + run["batch_size"]] for b in range(0, len(run["order"]), run["batch_size"])]
    rank0, rank1 = run["seen"]
    # Step by step, the two processes' images are disjoint parts of the global batch that one process
    # would train on, and together cover it, in order: 101 draws in 15 batches of 7 (the last of 3).
    assert len(rank0) == len(rank1) == len(batches) == 15
    assert [a + b for a, b in zip(rank0, rank1)] == batches
    assert [len(a) for a in rank0] == [4] * 14 + [2] and [len(b) for b in rank1] == [3] * 14 + [1]
    # ddp.spread deals item k to rank k mod 2 and gathers the results in item order.
    assert run["dealt"] == [[0, 0], [1, 1], [2, 0], [3, 1], [4, 0]]


def test_two_processes_repair_train_and_write_one_checkpoint(small_data, tmp_path):
    flags = ("--epochs", "2", "--fix-labels", "auto", "--repair-folds", "2", "--repair-epochs", "1")
    two = torchrun(small_data, tmp_path / "two", *flags)
    assert two.returncode == 0, two.stderr
    # Rank 0 alone speaks: one line per epoch, one report, each fold's line once.
    assert [line.split()[1] for line in two.stderr.splitlines() if line.startswith("epoch ")] == ["1", "2"]
    assert two.stdout.count("balanced accuracy") == 1
    assert two.stderr.count("fold 1/2") == 1 and two.stderr.count("fold 2/2: held-out agreement") == 1
    assert "in each of 2 processes" in two.stderr
    assert json.loads((tmp_path / "two" / "fig" / "training.json").read_text())["config"]["world_size"] == 2
    # The fold models are dealt out to the two processes and gathered in fold order: the repair is
    # the one a single process makes (fold k's model depends only on the seed and k).
    one = run_script("trainer.py", *trainer_args(small_data, tmp_path / "one", *flags)[1:], cwd=tmp_path,
                     env={"OMP_NUM_THREADS": "1"})
    assert one.returncode == 0, one.stderr
    assert (tmp_path / "one" / "fig" / "label_issues.json").read_bytes() == \
        (tmp_path / "two" / "fig" / "label_issues.json").read_bytes()
    # The checkpoint is the course-format file tester.py scores.
    tested = run_script("tester.py", "--checkpoint", tmp_path / "two" / "m.ckpt", "--data", small_data / "dev.pickle",
                        "--out", tmp_path / "tested", cwd=tmp_path)
    assert tested.returncode == 0, tested.stderr
    assert "balanced accuracy" in tested.stdout


def children(pid):
    """{RANK: pid} of the worker processes torchrun (pid) started."""
    workers = {}
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                env = dict(item.split("=", 1) for item in (proc / "environ").read_text().split("\0") if "=" in item)
                workers[int(env["RANK"])] = int(proc.name)
        except (OSError, KeyError, ValueError):
            continue
    return workers


@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="finds torchrun's workers through /proc")
def test_kill_9_of_one_process_then_resume_matches_an_uninterrupted_run(small_data, tmp_path):
    flags = ("--epochs", "4", "--fix-labels", "none")
    full = torchrun(small_data, tmp_path / "a", *flags)
    assert full.returncode == 0, full.stderr

    proc = subprocess.Popen([*TORCHRUN, *trainer_args(small_data, tmp_path / "b", *flags)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, env=ONE_THREAD)
    wait_for(tmp_path / "b" / "m.resume.pt")
    os.kill(children(proc.pid)[1], signal.SIGKILL)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode != 0
    assert len(error_lines(err)) == 1, err  # rank 0's one line; torchrun's own report follows it
    saved = torch.load(tmp_path / "b" / "m.resume.pt", weights_only=True)["epoch"]
    assert 1 <= saved < 4

    resumed = torchrun(small_data, tmp_path / "b", *flags, "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert f"after epoch {saved}" in resumed.stderr
    a, b = weights(tmp_path / "a" / "m.ckpt"), weights(tmp_path / "b" / "m.ckpt")
    assert all(torch.equal(a[key], b[key]) for key in a)


def test_adversarial_training_runs_under_torchrun(small_data, tmp_path):
    # The attack differentiates the unwrapped model: through DDP its backward passes would start
    # a gradient all-reduce that the training step then repeats, and DDP stops with an error.
    result = torchrun(small_data, tmp_path, "--epochs", "1", "--fix-labels", "none", "--adversarial", "fgsm-rs",
                      "--robust-eval", "32")
    assert result.returncode == 0, result.stderr
    report = json.loads((tmp_path / "fig" / "training.json").read_text())
    assert set(report["history"][0]["robust"]) == {"clean", "fgsm", "pgd"}
    assert result.stderr.count("32 dev images at eps") == 1


def test_a_mistake_under_torchrun_is_one_error_line(small_data, tmp_path):
    result = torchrun(small_data, tmp_path, "--lr-sweep", "1e-3")
    assert result.returncode != 0
    lines = error_lines(result.stderr)
    assert len(lines) == 1 and "--lr-sweep" in lines[0] and "python trainer.py" in lines[0], result.stderr
    # torchrun's failure report that follows names the cause (its error file), not only its docs' address.
    assert "Root Cause" in result.stderr and result.stderr.count("--lr-sweep compares") >= 2


def test_processes_that_read_different_data_stop_before_training(small_data, tmp_path):
    result = subprocess.run([*TORCHRUN, ROOT / "tests" / "distributed_data.py",
                             *trainer_args(small_data, tmp_path, "--epochs", "1", "--fix-labels", "none")[1:]],
                            capture_output=True, text=True, env=ONE_THREAD, timeout=600)
    assert result.returncode != 0
    lines = error_lines(result.stderr)
    assert len(lines) == 1, result.stderr
    assert f"{small_data / 'train.pickle'} differs between processes: process 1 (on " in lines[0]
    assert "read other data than process 0" in lines[0] and "give every process the same file" in lines[0]
    assert "epoch" not in result.stderr.split("differs between")[0]  # stopped before the first epoch
    assert not (tmp_path / "m.ckpt").exists()
