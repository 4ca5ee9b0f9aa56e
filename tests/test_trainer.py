"""trainer.py: sampler, augmentation, label repair, learning-rate study, checkpoints and resume."""
import json
import re
import signal
import subprocess
import sys
import time

import pytest
import torch

import label_repair
import trainer
from cli import UserError
from conftest import ROOT, reaped, run_script
from models import SimpleModel, load_model


def args_for(*argv):
    return trainer.parse_args(list(argv))


def repair(images, labels, args):
    """label_repair.repair_labels as trainer.py calls it, on the CPU."""
    return label_repair.repair_labels(images, labels, args, "cpu", trainer.fold_trainer(args, "cpu"))


def test_balanced_sampler_draws_each_class_about_equally():
    labels = torch.cat([torch.zeros(4600), torch.ones(400), torch.full((1400,), 2)]).long()
    order = trainer.epoch_indices(labels, "balanced", torch.Generator().manual_seed(0))
    assert len(order) == len(labels)
    share = torch.bincount(labels[order], minlength=3).float() / len(order)
    assert torch.allclose(share, torch.full((3,), 1 / 3), atol=0.03), share
    # Without the sampler the data's own imbalance comes through: a check that the test can fail.
    plain = trainer.epoch_indices(labels, "none", torch.Generator().manual_seed(0))
    assert sorted(plain.tolist()) == list(range(len(labels)))


def test_balanced_weights_are_inverse_class_counts():
    labels = torch.tensor([0, 0, 0, 0, 1, 2, 2])
    assert trainer.balanced_weights(labels).tolist() == pytest.approx([1 / 4] * 4 + [1.0] + [1 / 2] * 2)


def test_augmentation_keeps_shape_and_range_and_draws_per_image():
    g = torch.Generator().manual_seed(0)
    image = torch.rand(3, 32, 32, generator=g) * 2 - 1
    batch = image.expand(64, 3, 32, 32).contiguous()
    out = trainer.augment_batch(batch, torch.Generator().manual_seed(1))
    assert out.shape == batch.shape and out.dtype == torch.float32
    assert out.min() >= -1 and out.max() <= 1
    assert not torch.equal(out, batch)
    # Same input image, different random parameters per copy.
    assert (out[1:] - out[:1]).abs().flatten(1).amax(1).min() > 1e-3
    # Same generator seed, same result.
    assert torch.equal(out, trainer.augment_batch(batch, torch.Generator().manual_seed(1)))


def test_augmentation_flip_is_a_mirror_when_nothing_else_moves():
    image = torch.rand(1, 3, 32, 32) * 2 - 1
    for seed in range(40):  # find a draw that flips; with no rotation, shift or jitter it must mirror exactly
        out = trainer.augment_batch(image, torch.Generator().manual_seed(seed), max_degrees=0, max_shift=0, jitter=0)
        if not torch.allclose(out, image, atol=1e-5):
            assert torch.allclose(out, image.flip(3), atol=1e-5)
            return
    pytest.fail("no horizontal flip in 40 draws")


def planted_label_errors(n_per_class=120, flips=24, seed=0):
    """Easy synthetic classes (one bright colour channel each) with planted label errors."""
    g = torch.Generator().manual_seed(seed)
    true = torch.arange(3).repeat_interleave(n_per_class)
    images = torch.rand(len(true), 3, 32, 32, generator=g) * 0.6 - 0.9
    images[torch.arange(len(true)), true] += 1.2
    given = true.clone()
    planted = torch.randperm(len(true), generator=g)[:flips]
    given[planted] = (true[planted] + 1) % 3
    return images, true, given, set(planted.tolist())


def test_label_repair_finds_planted_errors(tmp_path):
    images, true, given, planted = planted_label_errors()
    args = args_for("--fix-labels", "auto", "--repair-folds", "3", "--repair-epochs", "3", "--figures", str(tmp_path),
                    "--no-augment")
    repaired, keep = repair(images, given, args)
    report = json.loads((tmp_path / "label_issues.json").read_text())
    found = {issue["index"] for issue in report["issues"]}
    assert len(found & planted) >= 0.8 * len(planted)
    assert len(found & planted) >= 0.9 * len(found)
    assert (repaired == true).float().mean() > (given == true).float().mean()
    assert keep.all()
    assert (tmp_path / "label_issues.png").stat().st_size > 0
    # README: the label_issues.json of an auto run is a --fix-labels FILE: it repeats the same repair.
    again, keep = repair(images, given, args_for("--fix-labels", str(tmp_path / "label_issues.json")))
    assert torch.equal(again, repaired) and keep.all()


def test_a_label_issues_json_as_fix_labels_applies_only_the_flags_acted_on(tmp_path):
    # label_issues.json as label repair writes it: the flags kept (acted: false) change nothing.
    issues = [{"index": 1, "given": "car", "suggested": "cat", "confidence": 0.91, "acted": True},
              {"index": 2, "given": "truck", "suggested": "car", "confidence": 0.88, "acted": False,
               "kept_because": label_repair.KEPT_TWO_WAY},
              {"index": 3, "given": "cat", "suggested": "truck", "confidence": 0.7, "acted": True}]
    path = tmp_path / "label_issues.json"
    path.write_text(json.dumps({"method": "confident learning", "action": "drop", "flagged": 3, "acted_on": 2,
                                "pairs": {}, "issues": issues}, indent=1))
    repaired, keep = repair(torch.zeros(5, 3, 32, 32), torch.tensor([0, 0, 1, 2, 1]),
                            args_for("--fix-labels", str(path)))
    assert repaired.tolist() == [0, 2, 1, 1, 1] and keep.all()


def test_directional_filter_keeps_one_way_noise_and_skips_two_way_confusion():
    # 100 cars, 100 trucks, 100 cats. Flags: 30 car->cat (one way: noise), 10 car->truck and
    # 12 truck->car (two-way confusion), 2 cat->car.
    sizes = torch.tensor([100, 100, 100])
    pairs = [(0, 2)] * 30 + [(0, 1)] * 10 + [(1, 0)] * 12 + [(2, 0)] * 2
    given, suggested = torch.tensor(pairs).T
    ok = label_repair.directional_pairs(given, suggested, sizes)
    assert ok[0, 2] and not ok[0, 1] and not ok[1, 0] and not ok[2, 0]
    # Rates and counts: 10 flags out of 1,000 cars are rarer than 12 out of 100 trucks, but 12
    # flags do not outnumber 10 (a strong model's few errors on a rare class are no noise) ...
    ok = label_repair.directional_pairs(given, suggested, torch.tensor([1000, 100, 100]))
    assert not ok[1, 0] and not ok[0, 1]
    # ... while 40 truck->car flags against 10 car->truck pass on both.
    given, suggested = torch.tensor([(1, 0)] * 40 + [(0, 1)] * 10).T
    ok = label_repair.directional_pairs(given, suggested, torch.tensor([1000, 100, 100]))
    assert ok[1, 0] and not ok[0, 1]


def test_label_repair_from_a_file_and_drop(tmp_path):
    labels = torch.tensor([0, 0, 1, 2])
    fixes = tmp_path / "fixes.json"
    fixes.write_text(json.dumps([{"index": 1, "label": "cat"}, {"index": 2, "label": 0}]))
    repaired, keep = repair(torch.zeros(4, 3, 32, 32), labels, args_for("--fix-labels", str(fixes)))
    assert repaired.tolist() == [0, 2, 0, 2] and keep.all()
    fixes.write_text(json.dumps([{"index": 3, "label": None}]))
    _, keep = repair(torch.zeros(4, 3, 32, 32), labels, args_for("--fix-labels", str(fixes)))
    assert keep.tolist() == [True, True, True, False]
    fixes.write_text(json.dumps([{"index": 9, "label": "cat"}]))
    with pytest.raises(UserError, match="entry 0"):
        repair(torch.zeros(4, 3, 32, 32), labels, args_for("--fix-labels", str(fixes)))


def test_same_seed_gives_identical_training_on_cpu():
    images, _, given, _ = planted_label_errors(n_per_class=40)
    args = args_for("--epochs", "1")
    a = trainer.fit(images, given, args, "cpu", epochs=2, salt="t")
    b = trainer.fit(images, given, args, "cpu", epochs=2, salt="t")
    c = trainer.fit(images, given, args_for("--seed", "1"), "cpu", epochs=2, salt="t")
    for key, value in a.state_dict().items():
        assert torch.equal(value, b.state_dict()[key]), key
    assert any(not torch.equal(v, c.state_dict()[k]) for k, v in a.state_dict().items())


def test_lr_sweep_marks_a_huge_rate_as_diverged(small_data, tmp_path):
    result = run_script("trainer.py", "--data", small_data / "train.pickle", "--lr-sweep", "1e-3", "1e9",
                        "--sweep-steps", "40", "--figures", tmp_path, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    runs = {r["lr"]: r for r in json.loads((tmp_path / "lr_sweep.json").read_text())}
    assert runs[1e9]["diverged"] and not runs[1e-3]["diverged"]
    assert len(runs[1e-3]["losses"]) == 40
    assert "diverged" in result.stdout
    assert (tmp_path / "lr_sweep.png").stat().st_size > 0


def test_divergence_in_training_is_one_clear_line(small_data, tmp_path):
    result = run_script("trainer.py", "--data", small_data / "train.pickle", "--dev-data", small_data / "dev.pickle",
                        "--epochs", "2", "--lr", "1e9", "--fix-labels", "none", "--out", tmp_path / "m.ckpt",
                        "--figures", tmp_path, cwd=tmp_path)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    # Epoch 1 diverges before anything is written: no state to point to, and none there.
    assert re.fullmatch(r"trainer\.py: error: training diverged in epoch 1 \(loss became (nan|inf) at step \d+ of "
                        r"the epoch\): lower the learning rate \(--lr 1e\+09\); nothing was saved", last), last
    assert not (tmp_path / "m.resume.pt").exists()


def test_divergence_after_a_saved_epoch_names_the_state_to_go_back_to(small_data, tmp_path, monkeypatch):
    from dataset import load_pickle

    calls = []
    run_epoch = trainer.run_epoch

    def second_epoch_diverges(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise FloatingPointError("loss became nan at step 3 of the epoch")
        return run_epoch(*args, **kwargs)

    monkeypatch.setattr(trainer, "run_epoch", second_epoch_diverges)
    args = args_for("--data", str(small_data / "train.pickle"), "--epochs", "3", "--fix-labels", "none",
                    "--out", str(tmp_path / "m.ckpt"), "--figures", str(tmp_path / "fig"), "--lr", "0.002")
    with pytest.raises(UserError) as diverged:
        trainer.train(*load_pickle(small_data / "train.pickle"), *load_pickle(small_data / "dev.pickle"), args, "cpu")
    assert str(diverged.value) == ("training diverged in epoch 2 (loss became nan at step 3 of the epoch): lower the "
                                   f"learning rate (--lr 0.002); the last good state (epoch 1) is in "
                                   f"{tmp_path / 'm.resume.pt'}")
    assert torch.load(tmp_path / "m.resume.pt", weights_only=True)["epoch"] == 1


def train_cmd(small_data, tmp_path, *extra):
    return [sys.executable, str(ROOT / "trainer.py"), "--data", str(small_data / "train.pickle"),
            "--dev-data", str(small_data / "dev.pickle"), "--out", str(tmp_path / "m.ckpt"),
            "--figures", str(tmp_path / "fig"), *extra]


def test_one_epoch_with_repair_writes_course_checkpoint_and_reports(small_data, tmp_path):
    result = run_script("trainer.py", *train_cmd(small_data, tmp_path, "--epochs", "1", "--fix-labels", "auto", "--repair-folds", "2",
                                                  "--repair-epochs", "1")[2:], cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    ckpt = torch.load(tmp_path / "m.ckpt", weights_only=True)
    assert set(ckpt) == {"model_state_dict"}
    SimpleModel().load_state_dict(ckpt["model_state_dict"])
    for name in ("training_curves.png", "label_issues.png", "label_issues.json", "training.json"):
        assert (tmp_path / "fig" / name).stat().st_size > 0, name
    assert "balanced accuracy" in result.stdout
    # tester.py reads what trainer.py wrote, and scores it as the training run did.
    tested = run_script("tester.py", "--checkpoint", tmp_path / "m.ckpt", "--data", small_data / "dev.pickle",
                        "--out", tmp_path / "fig", cwd=tmp_path)
    assert tested.returncode == 0, tested.stderr
    scored = json.loads((tmp_path / "fig" / "metrics_m.json").read_text())
    final = json.loads((tmp_path / "fig" / "training.json").read_text())["final_dev"]
    assert {k: scored[k] for k in final} == final


def wait_for(path, timeout=120):
    deadline = time.time() + timeout
    while not path.exists():
        assert time.time() < deadline, f"{path} never appeared"
        time.sleep(0.02)


@pytest.mark.parametrize("flags", [("--epochs", "6", "--fix-labels", "none"),
                                   ("--epochs", "3", "--fix-labels", "none", "--adversarial", "fgsm-rs",
                                    "--robust-eval", "32")], ids=["standard", "adversarial"])
def test_kill_9_then_resume_matches_an_uninterrupted_run(small_data, tmp_path, flags):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    full = subprocess.run(train_cmd(small_data, tmp_path / "a", *flags), capture_output=True, text=True, timeout=600)
    assert full.returncode == 0, full.stderr

    with reaped(subprocess.Popen(train_cmd(small_data, tmp_path / "b", *flags), stdout=subprocess.DEVNULL,
                                 stderr=subprocess.DEVNULL)) as proc:
        wait_for(tmp_path / "b" / "m.resume.pt")
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
    saved = torch.load(tmp_path / "b" / "m.resume.pt", weights_only=True)["epoch"]
    load_model(tmp_path / "b" / "m.ckpt")  # a valid checkpoint survived the kill
    assert 1 <= saved < int(flags[1])

    resumed = subprocess.run(train_cmd(small_data, tmp_path / "b", *flags, "--resume"), capture_output=True,
                             text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr
    assert f"after epoch {saved}" in resumed.stderr
    a = torch.load(tmp_path / "a" / "m.ckpt", weights_only=True)["model_state_dict"]
    b = torch.load(tmp_path / "b" / "m.ckpt", weights_only=True)["model_state_dict"]
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_ctrl_c_saves_and_exits_with_one_line(small_data, tmp_path):
    # 200 epochs (about a second each here): the signal, sent once epoch 1's state is written, lands
    # while the run is training, not after it finished. Exit status 130, as for any SIGINT.
    # A shell's background job (`pytest ... &`) has SIGINT ignored, and a child inherits that: the run
    # would train all 200 epochs. The trainer gets the default SIGINT, as a terminal's Ctrl-C finds it.
    with reaped(subprocess.Popen(train_cmd(small_data, tmp_path, "--epochs", "200", "--fix-labels", "none"),
                                 stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                                 preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))) as proc:
        wait_for(tmp_path / "m.resume.pt")
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]
    saved = torch.load(tmp_path / "m.resume.pt", weights_only=True)["epoch"]
    assert 1 <= saved < 200
    assert last == (f"trainer.py: error: interrupted: epoch {saved} of 200 is saved in {tmp_path / 'm.resume.pt'}; "
                    "continue with the same flags plus --resume")
    assert not (tmp_path / "m.ckpt.lock").exists()  # the lock let go


def interrupted_train(small_data, tmp_path, monkeypatch, where):
    """trainer.train on the small data, 2 epochs, with KeyboardInterrupt raised by the named trainer
    function the first time it is called: the Interrupted error's message."""
    from cli import Interrupted
    from dataset import load_pickle

    def stop(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(trainer, where, stop)
    args = args_for("--data", str(small_data / "train.pickle"), "--epochs", "2", "--fix-labels", "none",
                    "--out", str(tmp_path / "m.ckpt"), "--figures", str(tmp_path / "fig"))
    with pytest.raises(Interrupted) as stopped:
        trainer.train(*load_pickle(small_data / "train.pickle"), *load_pickle(small_data / "dev.pickle"), args, "cpu")
    return str(stopped.value)


def test_ctrl_c_before_the_first_save_says_nothing_was_saved(small_data, tmp_path, monkeypatch):
    # Stopped after epoch 1 was trained and scored, while its checkpoint was being written.
    message = interrupted_train(small_data, tmp_path, monkeypatch, "save_checkpoint")
    assert "before anything was saved" in message
    assert not (tmp_path / "m.resume.pt").exists()


def test_ctrl_c_right_after_the_state_is_written_names_the_epoch_on_disk(small_data, tmp_path, monkeypatch):
    # A Ctrl-C that arrives just after epoch 1's resume state is renamed into place (as a user who
    # sees the file appear, or the test above, may send it): the message must name epoch 1, which
    # is on disk, not say that nothing was saved.
    import os

    from cli import Interrupted
    from dataset import load_pickle

    real_write = trainer.atomic_write

    def write_then_ctrl_c(path, write):
        real_write(path, write)
        if str(path).endswith(".resume.pt"):
            os.kill(os.getpid(), signal.SIGINT)  # delivered now, between the write and what follows it

    monkeypatch.setattr(trainer, "atomic_write", write_then_ctrl_c)
    args = args_for("--data", str(small_data / "train.pickle"), "--epochs", "2", "--fix-labels", "none",
                    "--out", str(tmp_path / "m.ckpt"), "--figures", str(tmp_path / "fig"))
    # Python's own SIGINT handler, whatever this process inherited (a background job ignores SIGINT).
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with pytest.raises(Interrupted) as stopped:
            trainer.train(*load_pickle(small_data / "train.pickle"), *load_pickle(small_data / "dev.pickle"), args,
                          "cpu")
    finally:
        signal.signal(signal.SIGINT, previous)
    assert str(stopped.value) == (f"interrupted: epoch 1 of 2 is saved in {tmp_path / 'm.resume.pt'}; continue with "
                                  "the same flags plus --resume")
    assert torch.load(tmp_path / "m.resume.pt", weights_only=True)["epoch"] == 1


def test_ctrl_c_on_another_rank_leaves_the_report_to_rank_0(small_data, tmp_path, monkeypatch):
    import ddp

    monkeypatch.setattr(ddp, "is_main", lambda: False)
    calls = []
    run_epoch = trainer.run_epoch

    def second_epoch_stops(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return run_epoch(*args, **kwargs)

    monkeypatch.setattr(trainer, "run_epoch", second_epoch_stops)
    message = interrupted_train(small_data, tmp_path, monkeypatch, "epoch_line")  # never called off rank 0
    assert "interrupted after epoch 1 of 2; rank 0 writes the resume state" in message


def test_resume_with_other_settings_is_refused(small_data, tmp_path):
    first = subprocess.run(train_cmd(small_data, tmp_path, "--epochs", "1", "--fix-labels", "none"),
                           capture_output=True, text=True, timeout=600)
    assert first.returncode == 0, first.stderr
    again = subprocess.run(train_cmd(small_data, tmp_path, "--epochs", "1", "--fix-labels", "none", "--lr", "0.1",
                                     "--resume"), capture_output=True, text=True,
                           timeout=600)
    assert again.returncode != 0 and "lr" in again.stderr and "Traceback" not in again.stderr


# What trainer.py's flags are not part of a run's settings, and why. Every other flag defines the run: a
# resumed run must have the same value, or it would continue someone else's training silently.
NOT_RUN_SETTINGS = {
    "out": "where the run writes; the resume state is found next to it",
    "figures": "where the reports go",
    "resume": "the request itself",
    "device": "a state resumes on another device (docs/devices.md)",
    "cifar_dir": "only read to build missing data; the data itself is fingerprinted",
    "dev_data": "scored on after each epoch, never trained on",
    "lr_sweep": "a separate mode that writes no resume state",
    "sweep_steps": "the same separate mode",
}
# For each run-defining flag, a command line that changes it (and the setting it changes).
OTHER_SETTINGS = {
    "model": ["--model", "resnet8"], "epochs": ["--epochs", "7"], "lr": ["--lr", "0.01"],
    "batch_size": ["--batch-size", "16"], "optimizer": ["--optimizer", "sgd"],
    "weight_decay": ["--weight-decay", "0.001"],
    "schedule": ["--schedule", "cosine"], "label_smoothing": ["--label-smoothing", "0.1"],
    "sampler": ["--sampler", "sqrt"], "augment": ["--no-augment"], "fix_labels": ["--fix-labels", "auto"],
    "repair_folds": ["--repair-folds", "3"], "repair_epochs": ["--repair-epochs", "2"],
    "repair_action": ["--repair-action", "drop"], "repair_pairs": ["--repair-pairs", "all"],
    "repair_model": ["--repair-model", "best"], "seed": ["--seed", "1"], "data": ["--data", "other.pickle"],
    "adversarial": ["--adversarial", "pgd"], "adv_epsilon": ["--adv-epsilon", "0.01"],
    "adv_steps": ["--adv-steps", "3"],
    "adv_step_size": ["--adv-step-size", "0.01"], "robust_eval": ["--robust-eval", "10"],
    "arch": ["--model", "whitened"], "loss": ["--loss", "logit-adjusted"], "tau": ["--tau", "0.5"],
    "drw_start": ["--drw-start", "2"], "mix": ["--mix", "mixup"], "mix_alpha": ["--mix-alpha", "0.4"],
    "ema": ["--ema", "0.9"], "val_fraction": ["--val-fraction", "0.1"],
    "select": ["--select", "best-val", "--val-fraction", "0.1"], "amp": ["--amp"], "deterministic": ["--deterministic"],
}


def test_every_run_defining_flag_is_compared_on_resume(tmp_path):
    # Generated from trainer.py's own flags: a new flag must be either compared on resume or named above
    # with its reason; a flag left out of resume_state.RUN_KEYS would resume silently with other settings.
    import resume_state

    base = args_for("--fix-labels", "none")
    defining = set(vars(base)) - set(NOT_RUN_SETTINGS)
    assert set(OTHER_SETTINGS) == defining
    assert set(resume_state.RUN_KEYS) == defining
    # A state of the base run, as trainer.py writes its config; resumed with each setting changed.
    path = tmp_path / "m.resume.pt"
    state = {k: None for k in ("model", "optimizer", "scheduler", "history", "labels", "keep", "average", "best")}
    state.update(epoch=1, data_sha256="0" * 64, config={k: getattr(base, k) for k in resume_state.RUN_KEYS})
    torch.save(state, path)
    labels = torch.zeros(4, dtype=torch.long)
    for key, argv in OTHER_SETTINGS.items():
        args = args_for("--fix-labels", "none", *argv)
        assert getattr(args, key) != getattr(base, key), key
        changed = [k for k in defining if getattr(args, k) != getattr(base, k)]
        with pytest.raises(UserError) as refused:
            resume_state.load_resume(path, args, "0" * 64, labels)
        message = str(refused.value)
        assert message.startswith(f"--resume: {path}: belongs to a run with other settings (") and \
            message.endswith("); use the same flags or start without --resume"), (key, message)
        parts = message.split("other settings (", 1)[1].rsplit("); use the same flags", 1)[0].split("; ")
        more = int(parts.pop().split()[0]) if parts[-1].endswith(" more") else 0
        named = [part.split()[0] for part in parts]
        assert set(named) <= set(changed) and len(named) + more == len(changed), (key, message)
        assert key in named or more, (key, message)
    # The same flags pass the settings (and stop at the next check of this skeleton state).
    with pytest.raises(UserError, match="labels|keep|history") as refused:
        resume_state.load_resume(path, base, "0" * 64, labels)
    assert "other settings" not in str(refused.value)


def test_the_kept_best_checkpoint_must_reach_its_recorded_score_within_a_hundredth(briefly_trained):
    # resume_state.check_kept_checkpoint: with --select best-val the checkpoint is scored again on the
    # validation split; it may score higher than the state records, or up to a hundredth lower (another
    # device's rounding), not more: a raised record would keep an epoch that did not win.
    from sklearn.metrics import balanced_accuracy_score

    from conftest import softmax_by_hand
    from resume_state import check_kept_checkpoint

    model, checkpoint, val_x, val_y = briefly_trained
    score = balanced_accuracy_score(val_y.numpy(), softmax_by_hand(model, val_x).argmax(1).numpy())
    for recorded in (score, score + 0.009, score - 0.3):
        check_kept_checkpoint({"epoch": 3, "score": recorded}, checkpoint, val_x, val_y, "cpu", "m.resume.pt")
    for recorded in (score + 0.011, score + 0.2):
        with pytest.raises(UserError) as refused:
            check_kept_checkpoint({"epoch": 3, "score": recorded}, checkpoint, val_x, val_y, "cpu", "m.resume.pt")
        assert str(refused.value) == (f"--resume: m.resume.pt: best says epoch 3 scored {recorded:.4f} on the "
                                      f"validation split, but {checkpoint} scores {score:.4f}; delete it to start "
                                      "over, or run without --resume")


def test_bad_fix_labels_file_is_one_line(small_data, tmp_path):
    result = run_script("trainer.py", *train_cmd(small_data, tmp_path, "--fix-labels", tmp_path / "nope.json")[2:],
                        cwd=tmp_path)
    assert result.returncode != 0
    assert result.stderr.strip().count("\n") == 0 and "nope.json" in result.stderr
