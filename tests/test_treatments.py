"""trainer.py's imbalance treatments, validation split and --model best (fast: tiny data)."""
import argparse
import json

import pytest
import torch
import torch.nn.functional as F

import lr_sweep
import trainer
import treatments
from cli import UserError
from conftest import run_script
from dataset import load_pickle
from models import WhitenedCNN, load_model


def args_for(*argv):
    return trainer.parse_args(list(argv))


def test_logit_adjustment_shifts_logits_by_tau_log_prior():
    logits = torch.tensor([[2.0, 0.0, 1.0]])
    prior = torch.tensor([0.72, 0.06, 0.22])
    # By hand: tau 0.5 turns the logits into [2 + 0.5 ln .72, 0.5 ln .06, 1 + 0.5 ln .22]
    # = [1.83575, -1.40671, 0.24294]; the loss of class 1 is logsumexp - (-1.40671) = 3.45952.
    shifted = torch.tensor([1.835748, -1.406705, 0.242936])
    expected = torch.logsumexp(shifted, 0) - shifted[1]
    got = treatments.logit_adjusted_cross_entropy(logits, torch.tensor([1]), prior.log(), tau=0.5)
    assert got.item() == pytest.approx(expected.item(), abs=1e-5)
    assert got.item() == pytest.approx(3.45952, abs=1e-4)
    # tau 0 is plain cross-entropy; adjusting raises the loss of the rare class over plain CE.
    plain = F.cross_entropy(logits, torch.tensor([1]))
    assert treatments.logit_adjusted_cross_entropy(logits, torch.tensor([1]), prior.log(), tau=0.0) == plain
    assert got > plain


def test_balanced_softmax_is_cross_entropy_under_a_uniform_prior_and_weights_by_prior():
    torch.manual_seed(0)
    logits, targets = torch.randn(8, 3), torch.randint(0, 3, (8,))
    uniform = torch.full((3,), 1 / 3)
    # --loss balanced-softmax (Ren et al. 2020) is logit adjustment with tau 1: prior_j exp(z_j) = exp(z_j + log prior_j).
    assert torch.allclose(treatments.logit_adjusted_cross_entropy(logits, targets, uniform.log(), tau=1.0),
                          F.cross_entropy(logits, targets))
    # Ren et al.'s form: -log(prior_y exp(z_y) / sum_j prior_j exp(z_j)).
    prior = torch.tensor([0.72, 0.06, 0.22])
    weighted = prior * logits.exp()
    by_hand = -(weighted[torch.arange(8), targets] / weighted.sum(1)).log().mean()
    assert torch.allclose(treatments.logit_adjusted_cross_entropy(logits, targets, prior.log(), tau=1.0), by_hand,
                          atol=1e-6)


def test_balanced_softmax_uses_tau_1_whatever_tau_the_arguments_hold(capsys):
    # README/--help: balanced-softmax is "the same with tau 1". A --tau beside it is refused rather than ignored;
    # and the loss does not read args.tau for it (a recipe's or fold model's tau never reaches it).
    torch.manual_seed(0)
    logits, targets = torch.randn(8, 3), torch.randint(0, 3, (8,))
    labels = torch.tensor([0] * 72 + [1] * 6 + [2] * 22)
    log_prior = treatments.label_log_prior(labels)
    prior = torch.tensor([0.72, 0.06, 0.22])
    weighted = prior * logits.exp()
    ren = -(weighted[torch.arange(8), targets] / weighted.sum(1)).log().mean()  # Ren et al. 2020, by hand
    for tau in (1.0, 0.3, 2.0):
        args = argparse.Namespace(**{**vars(args_for("--loss", "balanced-softmax")), "tau": tau})
        assert torch.allclose(treatments.batch_loss(logits, targets, targets, 1.0, args, log_prior), ren, atol=1e-6)
    adjusted = args_for("--loss", "logit-adjusted", "--tau", "0.3")  # the other loss takes its tau
    shifted = logits + 0.3 * prior.log()
    assert torch.allclose(treatments.batch_loss(logits, targets, targets, 1.0, adjusted, log_prior),
                          F.cross_entropy(shifted, targets), atol=1e-6)
    assert args_for("--loss", "balanced-softmax", "--tau", "1").tau == 1.0
    with pytest.raises(SystemExit) as refused:
        args_for("--loss", "balanced-softmax", "--tau", "0.5")
    assert refused.value.code == 2
    assert capsys.readouterr().err.endswith(
        ": error: --tau 0.5 does not apply to --loss balanced-softmax, which is logit adjustment with tau 1; for "
        "another tau use --loss logit-adjusted (see --help)\n")


def test_label_prior_is_the_share_of_each_class():
    labels = torch.tensor([0] * 90 + [1] * 10)
    assert treatments.label_log_prior(labels).exp().tolist() == pytest.approx([0.9, 0.1, 0.0], abs=1e-6)


def test_drw_switches_to_the_sampler_at_the_stated_epoch():
    args = args_for("--drw-start", "4", "--epochs", "6")
    assert [treatments.epoch_sampler(args, e) for e in range(1, 7)] == ["none"] * 3 + ["balanced"] * 3
    assert {treatments.epoch_sampler(args_for(), e) for e in range(1, 61)} == {"balanced"}
    # What the epochs draw: the data's own shares before the switch, about equal shares after.
    labels = torch.tensor([0] * 900 + [1] * 100)
    seen = []

    def record(model, optimizer, scheduler, images, labels_, args_, generator, device, **kw):
        seen.append((kw["sampler"], trainer.epoch_indices(labels_, kw["sampler"], generator)))
        return [0.0]

    original = trainer.run_epoch
    trainer.run_epoch = record
    try:  # the training loop's epochs 1-6: the sampler each is given
        trainer.fit(torch.zeros(len(labels), 3, 32, 32), labels, args, "cpu", epochs=6, salt="t")
    finally:
        trainer.run_epoch = original
    assert [sampler for sampler, _ in seen] == ["none"] * 3 + ["balanced"] * 3
    (before, order_before), (after, order_after) = seen[2:4]
    assert (before, after) == ("none", "balanced")
    assert (labels[order_before] == 1).float().mean() == pytest.approx(0.1)
    assert (labels[order_after] == 1).float().mean() == pytest.approx(0.5, abs=0.06)


def test_mixup_and_cutmix_mix_images_and_report_the_share():
    x = torch.stack([torch.full((3, 32, 32), float(v)) for v in range(8)])
    y = torch.arange(8) % 3
    g = torch.Generator().manual_seed(0)
    mixed, y_a, y_b, lam = treatments.mix_batch(x, y, "mixup", 1.0, g)
    assert 0 <= lam <= 1 and torch.equal(y_a, y)
    # Each image is lam * itself + (1 - lam) * its partner, whose label is y_b.
    partner_value = (mixed[:, 0, 0, 0] - lam * x[:, 0, 0, 0]) / (1 - lam)
    assert torch.allclose(y[partner_value.round().long()], y_b)
    cut, y_a, y_b, lam = treatments.mix_batch(x, y, "cutmix", 1.0, torch.Generator().manual_seed(3))
    own = (cut == x).all(1).float().mean((1, 2))  # share of each image's pixels left as they were
    moved = y_b != y_a
    assert torch.allclose(own[moved], torch.full_like(own[moved], lam))
    # Same generator state, same mix.
    again = treatments.mix_batch(x, y, "cutmix", 1.0, torch.Generator().manual_seed(3))
    assert torch.equal(again[0], cut) and again[3] == lam


def test_ema_follows_the_weights_with_warmup():
    model = torch.nn.Linear(2, 1)
    args = args_for("--ema", "0.9")
    average = treatments.new_average(model, args)
    assert treatments.new_average(model, args_for()) is None
    with torch.no_grad():
        model.weight.fill_(1.0)
    decay = treatments.ema_decay(args, 1)
    assert decay == pytest.approx(2 / 11)  # warm-up: (1 + t) / (10 + t) below 0.9
    before = average["weight"].clone()
    treatments.update_average(average, model, decay)
    assert torch.allclose(average["weight"], decay * before + (1 - decay) * 1.0)
    assert treatments.ema_decay(args, 10_000) == 0.9
    assert torch.equal(treatments.averaged_model(model, average).weight, average["weight"])


def test_validation_split_is_stratified_seeded_and_disjoint():
    labels = torch.tensor([0] * 460 + [1] * 40 + [2] * 140)[torch.randperm(640, generator=torch.Generator().manual_seed(0))]
    train_idx, val_idx = treatments.validation_split(labels, 0.1, torch.Generator().manual_seed(0))
    assert set(train_idx.tolist()).isdisjoint(val_idx.tolist())
    assert sorted(train_idx.tolist() + val_idx.tolist()) == list(range(640))
    assert torch.bincount(labels[val_idx], minlength=3).tolist() == [46, 4, 14]
    again = treatments.validation_split(labels, 0.1, torch.Generator().manual_seed(0))
    assert torch.equal(again[1], val_idx) and torch.equal(again[0], train_idx)
    assert not torch.equal(treatments.validation_split(labels, 0.1, torch.Generator().manual_seed(1))[1], val_idx)
    assert len(treatments.validation_split(labels, 0.0, torch.Generator().manual_seed(0))[1]) == 0


def test_validation_split_holds_out_at_least_one_image_of_each_class_that_has_two():
    # docstring: round(fraction x count) per class, at least one when fraction > 0; a class's only image trains.
    labels = torch.tensor([0] * 40 + [1] * 3 + [2] * 1)
    train_idx, val_idx = treatments.validation_split(labels, 0.1, torch.Generator().manual_seed(0))
    assert torch.bincount(labels[val_idx], minlength=3).tolist() == [4, 1, 0]  # round(0.3) = 0, but one truck
    assert torch.bincount(labels[train_idx], minlength=3).tolist() == [36, 2, 1]
    labels = torch.tensor([0] * 5 + [1] * 2 + [2] * 2)
    _, val_idx = treatments.validation_split(labels, 0.01, torch.Generator().manual_seed(0))
    assert torch.bincount(labels[val_idx], minlength=3).tolist() == [1, 1, 1]


def test_model_best_resolves_to_a_registered_architecture():
    args = args_for("--model", "best")
    assert args.model == "best" and args.arch == WhitenedCNN.arch
    assert args_for().arch == "simple" and args_for("--model", "resnet8").arch == "resnet8"


def test_whitening_layer_decorrelates_patches():
    g = torch.Generator().manual_seed(0)
    base = torch.rand(64, 1, 33, 33, generator=g)
    images = (base[:, :, :32, :32] + base[:, :, 1:, 1:]).expand(64, 3, 32, 32) - 1  # correlated pixels
    model = WhitenedCNN()
    model.init_whitening(images)
    assert not model.whiten.weight.requires_grad
    out = F.conv2d(images, model.whiten.weight[:12])
    flat = out.permute(0, 2, 3, 1).reshape(-1, 12)
    covariance = flat.T @ flat / len(flat)
    strong = torch.diagonal(covariance) > 0.5  # directions with variance well above eps
    assert strong.sum() >= 3
    off = covariance[strong][:, strong] - torch.diag(torch.diagonal(covariance)[strong])
    assert off.abs().max() < 1e-3
    assert torch.diagonal(covariance)[strong].sub(1).abs().max() < 0.05


def test_mixed_and_adjusted_run_is_repeatable():
    g = torch.Generator().manual_seed(0)
    images, labels = torch.rand(96, 3, 32, 32, generator=g) * 2 - 1, torch.tensor([0] * 70 + [1] * 8 + [2] * 18)
    args = args_for("--model", "best", "--mix", "cutmix", "--loss", "logit-adjusted", "--sampler", "sqrt",
                    "--ema", "0.9", "--batch-size", "32")
    a = trainer.fit(images, labels, args, "cpu", epochs=2, salt="t")
    b = trainer.fit(images, labels, args, "cpu", epochs=2, salt="t")
    for key, value in a.state_dict().items():
        assert torch.equal(value, b.state_dict()[key]), key


def tiny_run(small_data, tmp_path, *extra):
    return run_script("trainer.py", "--data", small_data / "train.pickle", "--dev-data", small_data / "dev.pickle",
                      "--out", tmp_path / "m.ckpt", "--figures", tmp_path / "fig", *extra, cwd=tmp_path)


def test_model_best_round_trips_through_tester_and_adversarial_example(small_data, tmp_path):
    result = tiny_run(small_data, tmp_path, "--model", "best", "--epochs", "2", "--fix-labels", "none",
                      "--val-fraction", "0.2", "--select", "best-val")
    assert result.returncode == 0, result.stderr
    ckpt = torch.load(tmp_path / "m.ckpt", weights_only=True)
    assert ckpt["arch"] == WhitenedCNN.arch
    model = load_model(tmp_path / "m.ckpt")
    assert isinstance(model, WhitenedCNN) and model.whiten.weight.abs().sum() > 0  # whitening saved
    summary = json.loads((tmp_path / "fig" / "training.json").read_text())
    val = [h["val"]["balanced_accuracy"] for h in summary["history"]]
    assert summary["selected_epoch"] == val.index(max(val)) + 1  # the best recorded (test_promises: in depth)
    # Log lines, not bar redraws, when stderr is not a terminal: one line per epoch.
    assert "\r" not in result.stderr
    assert sum(line.startswith("epoch ") for line in result.stderr.splitlines()) == 2
    tested = run_script("tester.py", "--checkpoint", tmp_path / "m.ckpt", "--data", small_data / "dev.pickle",
                        "--tta", "none", "--out", tmp_path / "fig", cwd=tmp_path)
    assert tested.returncode == 0, tested.stderr
    metrics = json.loads((tmp_path / "fig" / "metrics_m.json").read_text())
    assert metrics["balanced_accuracy"] == pytest.approx(summary["final_dev"]["balanced_accuracy"])
    attacked = run_script("adversarialExample.py", "--checkpoint", tmp_path / "m.ckpt", "--data",
                          small_data / "dev.pickle", "--epsilons", "0", "0.03", "--examples", "1",
                          "--out", tmp_path / "adv", cwd=tmp_path)
    assert attacked.returncode == 0, attacked.stderr
    report = json.loads((tmp_path / "adv" / "adversarial.json").read_text())
    assert report["clean_accuracy"] == pytest.approx(metrics["accuracy"])  # the same model, read the same way
    assert report["results"]["fgsm"][1]["accuracy_attacked"] < 1 and len(report["examples"]) == 1


def test_repair_model_best_runs_its_fold_models(small_data, tmp_path):
    result = tiny_run(small_data, tmp_path, "--epochs", "1", "--fix-labels", "auto", "--repair-model", "best",
                      "--repair-folds", "2",
                      "--repair-epochs", "1")
    assert result.returncode == 0, result.stderr
    assert "best fold models, 1 epochs per fold" in result.stderr
    assert sum(line.lstrip().startswith("fold ") for line in result.stderr.splitlines()) == 2
    assert (tmp_path / "fig" / "label_issues.json").exists()


def test_resume_with_treatments_matches_an_uninterrupted_run(small_data, tmp_path, monkeypatch):
    # EMA weights, the kept best-validation state, the DRW phase and the mixing draws must all
    # survive an interruption: stop after epoch 2 of 3 (Ctrl-C), resume, compare with a full run.
    train_x, train_y = load_pickle(small_data / "train.pickle")
    dev_x, dev_y = load_pickle(small_data / "dev.pickle")

    def train(out, *extra):
        args = args_for("--model", "best", "--epochs", "3", "--fix-labels", "none", "--ema", "0.9", "--mix",
                        "mixup", "--drw-start", "2", "--val-fraction", "0.2", "--select", "best-val",
                        "--batch-size", "128", "--out", str(out / "m.ckpt"), "--figures", str(out), *extra)
        trainer.train(train_x, train_y, dev_x, dev_y, args, "cpu")

    train(tmp_path / "a")
    line = trainer.epoch_line

    def interrupt_in_epoch_3(epoch, *rest):
        if epoch == 3:
            raise KeyboardInterrupt
        return line(epoch, *rest)

    monkeypatch.setattr(trainer, "epoch_line", interrupt_in_epoch_3)
    with pytest.raises(UserError, match="interrupted"):
        train(tmp_path / "b")
    assert torch.load(tmp_path / "b" / "m.resume.pt", weights_only=True)["epoch"] == 2
    monkeypatch.setattr(trainer, "epoch_line", line)
    train(tmp_path / "b", "--resume")
    a = torch.load(tmp_path / "a" / "m.ckpt", weights_only=True)["model_state_dict"]
    b = torch.load(tmp_path / "b" / "m.ckpt", weights_only=True)["model_state_dict"]
    for key in a:
        assert torch.equal(a[key], b[key]), key
    ra = torch.load(tmp_path / "a" / "m.resume.pt", weights_only=True)
    rb = torch.load(tmp_path / "b" / "m.resume.pt", weights_only=True)
    for key in ra["model"]:
        assert torch.equal(ra["model"][key], rb["model"][key]), key
        assert torch.equal(ra["average"][key], rb["average"][key]), key
    assert ra["best"]["epoch"] == rb["best"]["epoch"]


def test_lr_sweep_uses_the_chosen_loss_with_mixing(tmp_path, monkeypatch):
    # --model best mixes (cutmix); with a logit-adjusted loss the sweep must train with that
    # loss too, not crash on a missing prior.
    seen = []
    real = trainer.batch_loss
    monkeypatch.setattr(trainer, "batch_loss", lambda *a: seen.append(a[-1]) or real(*a))
    args = args_for("--model", "best", "--loss", "logit-adjusted", "--lr-sweep", "0.01", "--sweep-steps", "2",
                    "--batch-size", "8", "--figures", str(tmp_path))
    images, labels = torch.rand(32, 3, 32, 32) * 2 - 1, torch.tensor([0] * 20 + [1] * 4 + [2] * 8)
    lr_sweep.lr_sweep(args.lr_sweep, args.sweep_steps, trainer.sweep_runs(images, labels, args, "cpu"), args.figures)
    assert len(seen) == 2 and torch.allclose(seen[0], treatments.label_log_prior(labels))
    assert (tmp_path / "lr_sweep.json").exists()


def test_whitened_model_saves_and_loads_in_place_like_the_course_models(tmp_path):
    net = WhitenedCNN()
    net.init_whitening(torch.rand(64, 3, 32, 32) * 2 - 1)
    net.save(tmp_path / "w.ckpt")
    other = WhitenedCNN()
    other.load(tmp_path / "w.ckpt")  # course style: into this model
    for key, value in net.state_dict().items():
        assert torch.equal(value, other.state_dict()[key]), key


def test_drw_start_at_the_last_epoch_is_accepted():
    # Refusing 61 and other bad treatment flags: test_hostile_inputs.py's FLAG_CASES, one line naming the flag.
    assert args_for("--drw-start", "60").drw_start == 60
