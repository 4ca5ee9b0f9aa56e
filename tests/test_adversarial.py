"""adversarialExample.py: FGSM/PGD against hand computations, evaluation invariants, the script's outputs."""
import json
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import adversarialExample as adv
import attacks
from conftest import fgsm_by_hand, run_script, softmax_by_hand
from dataset import CLASSES
from models import predict

CAT = CLASSES.index("cat")
# One thread: these models are tiny, and on a busy 2-core machine a second OpenMP thread
# that spins while waiting for a core made this file several times slower (34 s vs 5 s).
ONE_THREAD = {"OMP_NUM_THREADS": "1"}


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: small models, one thread


def tiny_model():
    """A small conv net in float64 (no sign ties from rounding), with dropout to catch train mode."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Dropout(0.5), nn.Linear(4 * 30 * 30, 3)
    ).double()


def boundary_images(n=4):
    """Images in [-1, 1] with many pixels at or near the ends, so the clamp must act."""
    g = torch.Generator().manual_seed(1)
    x = torch.rand(n, 3, 32, 32, generator=g, dtype=torch.float64) * 2 - 1
    x[:, :, :8] = 1.0
    x[:, :, 8:16] = -0.98
    return x


def hand_fgsm(model, image, label, epsilon, target=None):
    """One image at a time, gradient from torch.autograd.grad, step 2*eps in normalized space."""
    x = image[None].clone().requires_grad_(True)
    goal = label if target is None else target
    loss = F.cross_entropy(model(x), torch.tensor([goal]))
    (grad,) = torch.autograd.grad(loss, x)
    direction = grad.sign() if target is None else -grad.sign()
    return (x + 2 * epsilon * direction).clamp(-1, 1).detach()[0], direction[0]


@pytest.mark.parametrize("target", [None, CAT])
def test_fgsm_matches_hand_computation_with_clamp(target):
    model = tiny_model()
    x = boundary_images()
    y = torch.tensor([0, 1, 2, 0])
    epsilon = 0.05
    model.eval()
    expected = [hand_fgsm(model, x[i], int(y[i]), epsilon, target) for i in range(len(x))]
    model.train()  # fgsm_perturb must switch dropout off itself, and give train mode back
    got = attacks.fgsm_perturb(model, x, y, epsilon, target=target)
    assert model.training

    for i, (want, direction) in enumerate(expected):
        torch.testing.assert_close(got[i], want, rtol=0, atol=1e-12)
        unclamped = (x[i] + 0.1 * direction).abs() <= 1
        assert (~unclamped).sum() > 100  # the clamp really was exercised
        free = unclamped & (direction != 0)
        # 2*eps = 0.1 in the [-1, 1] space wherever the clamp did not cut the step short.
        torch.testing.assert_close((got[i] - x[i]).abs()[free], torch.full((int(free.sum()),), 0.1, dtype=x.dtype))
    assert got.min() >= -1 and got.max() <= 1


def test_pgd_one_full_step_is_fgsm_and_stays_in_the_ball():
    model = tiny_model().eval()
    x, y = boundary_images(), torch.tensor([0, 1, 2, 0])
    one_step = attacks.pgd_perturb(model, x, y, 0.05, steps=1, step_size=0.05)
    torch.testing.assert_close(one_step, attacks.fgsm_perturb(model, x, y, 0.05), rtol=0, atol=1e-12)

    g = torch.Generator().manual_seed(0)
    out = attacks.pgd_perturb(model, x, y, 0.03, steps=5, step_size=0.02, random_start=True, generator=g)
    assert (out - x).abs().max() <= 0.06 + 1e-12
    assert out.min() >= -1 and out.max() <= 1
    assert torch.equal(attacks.pgd_perturb(model, x, y, 0.0, random_start=True, generator=g), x)


def test_choose_examples_is_seeded_covers_classes_and_prefers_fooled():
    true = torch.tensor([0, 0, 0, 0, 1, 1, 2, 2, 2])
    fooled = torch.tensor([False, True, False, True, False, False, True, False, False])
    pick = lambda n: adv.choose_examples(true, fooled, n, torch.Generator().manual_seed(3))  # noqa: E731
    assert pick(3) == pick(3)
    assert sorted(int(true[i]) for i in pick(3)) == [0, 1, 2]
    assert all(fooled[i] for i in pick(3) if int(true[i]) in (0, 2))
    assert len(pick(20)) == len(true)


# ---------------------------------------------------------------------------
# A real (briefly) trained model on small CIFAR-10 data: conftest's briefly_trained


def _attacks(steps=10):
    pgd = lambda m, x, y, eps, target=None: attacks.pgd_perturb(m, x, y, eps, steps=steps, target=target)  # noqa: E731
    return {"fgsm": attacks.fgsm_perturb, "pgd": pgd}


def test_epsilon_zero_gives_clean_accuracy_and_pgd_is_not_weaker(briefly_trained):
    model, _, x, y = briefly_trained
    clean = int((predict(model, x) == y).sum()) / len(y)
    assert clean > 0.5  # the model did learn: the attack has something to break
    summary, _ = adv.evaluate(model, _attacks(), x, y, [0.0, 0.01, 0.03], 100, "cpu", progress=False)
    assert summary["clean_accuracy"] == clean
    for name, rows in summary["results"].items():
        assert rows[0]["accuracy_dev"] == clean, name
        assert rows[0]["accuracy_attacked"] == 1.0, name
    for fgsm, pgd in zip(summary["results"]["fgsm"], summary["results"]["pgd"]):
        assert pgd["accuracy_attacked"] <= fgsm["accuracy_attacked"], fgsm["epsilon"]
    assert summary["results"]["fgsm"][-1]["accuracy_attacked"] < 0.9  # eps 0.03 does hurt


def test_targeted_attack_raises_target_probability(briefly_trained):
    model, _, x, y = briefly_trained
    keep = (predict(model, x) == y) & (y != CAT)
    x, y = x[keep], y[keep]
    before = predict(model, x, probabilities=True)[:, CAT]
    for attack in _attacks(steps=5).values():
        after = predict(model, attack(model, x, y, 0.03, target=CAT), probabilities=True)[:, CAT]
        assert after.mean() > before.mean() + 0.05
        assert (after > before).float().mean() > 0.9


def test_script_writes_figures_and_json(briefly_trained, small_data, tmp_path):
    model, ckpt, x, y = briefly_trained
    out = tmp_path / "figs"
    result = run_script(
        "adversarialExample.py", "--checkpoint", ckpt, "--data", small_data / "dev.pickle", "--out", out,
        "--attack", "pgd", "--steps", 3, "--epsilons", 0.03, 0, 0.1, "--examples", 3, "--batch-size", 100,
        cwd=tmp_path, env=ONE_THREAD,
    )
    assert result.returncode == 0, result.stderr
    assert "attacked set" in result.stdout and "dev balanced" in result.stdout and "sanity:" in result.stdout
    report = json.loads((out / "adversarial.json").read_text())
    right = softmax_by_hand(model, x).argmax(1) == y
    clean = int(right.sum()) / len(y)
    assert report["clean_accuracy"] == pytest.approx(clean)
    # Only the correctly classified images are attacked.
    assert report["attacked_images"] == int(right.sum())
    assert all(right[e["dev_index"]] for e in report["examples"])
    printed = {tuple(cell.strip() for cell in line.split("|")) for line in result.stdout.splitlines()
               if line.count("|") == 4}
    for name, title in (("fgsm", "FGSM"), ("pgd", "PGD-3")):
        rows = report["results"][name]
        assert [r["epsilon"] for r in rows] == [0, 0.03, 0.1]
        assert rows[0]["accuracy_dev"] == pytest.approx(clean)
        assert sum(sum(c.values()) for c in rows[1]["flips"].values()) == report["attacked_images"]
        for r in rows:  # the table shows the JSON's numbers, each in its column
            assert (f"{r['epsilon']:g}", title, *(f"{100 * r[k]:.1f}%" for k in
                    ("accuracy_attacked", "accuracy_dev", "balanced_dev"))) in printed, (name, r["epsilon"])
    for r in report["results"]["fgsm"]:  # FGSM's numbers are FGSM's, written out in conftest
        still = softmax_by_hand(model, fgsm_by_hand(model, x[right], y[right], r["epsilon"])).argmax(1) == y[right]
        assert r["accuracy_attacked_this_epsilon"] == pytest.approx(float(still.float().mean()), abs=1.5 / len(still))
    assert len(report["examples"]) == 3
    assert sorted(e["true"] for e in report["examples"]) == sorted(CLASSES)
    pngs = [out / "fgsm_accuracy.png", out / "adversarial" / "overview.png"]
    pngs += [Path(p) for e in report["examples"] for p in e["files"].values()]
    assert len(pngs) == 2 + 3 * 4
    for png in pngs:
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", png


@pytest.mark.parametrize("args, path", [(["--checkpoint", "nowhere/missing.ckpt"], "nowhere/missing.ckpt"),
                                        ([], "checkpoints/trained.ckpt")])  # the default, absent in a fresh folder
def test_a_missing_checkpoint_is_one_clear_line(args, path, tmp_path):
    # Bad flag values (--epsilons outside [0, 1], ...): test_hostile_inputs.py's FLAG_CASES.
    result = run_script("adversarialExample.py", *args, cwd=tmp_path, timeout=120, env=ONE_THREAD)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr == (f"adversarialExample.py: error: {path}: no such checkpoint; train one with "
                             "`python trainer.py` or pass --checkpoint PATH\n")


def test_a_new_run_leaves_no_example_figure_of_an_earlier_one(tmp_path):
    # A run with fewer --examples than the last (or none) must not leave the last run's panels and
    # overview beside its own, where they would pass for this run's; other files in the folder stay.
    from adversarial_figures import save_examples

    def examples(classes):
        g = torch.Generator().manual_seed(0)
        probs = torch.tensor([0.2, 0.3, 0.5])
        return [{"dev_index": k, "true": name, "original": torch.rand(3, 32, 32, generator=g) * 2 - 1,
                 "noise": torch.zeros(3, 32, 32), "distorted": torch.rand(3, 32, 32, generator=g) * 2 - 1,
                 "probs": [probs, probs, probs]} for k, name in enumerate(classes)]

    out = tmp_path / "adversarial"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    (out / "example.png").write_bytes(b"not one of ours")  # no "_": not a name the script writes
    records = save_examples(out, examples(["car", "truck", "cat"]), 0.03, "FGSM")
    first = {Path(f).name for r in records for f in r["files"].values()}
    assert len(first) == 12 and {p.name for p in out.iterdir()} == first | {"overview.png", "notes.txt", "example.png"}
    records = save_examples(out, examples(["cat"]), 0.03, "FGSM")
    assert {p.name for p in out.iterdir()} == {f"example0_cat_{part}.png" for part in
                                               ("original", "noise", "distorted", "panel")} | \
        {"overview.png", "notes.txt", "example.png"}
    assert save_examples(out, [], 0.03, "FGSM") == []
    assert {p.name for p in out.iterdir()} == {"notes.txt", "example.png"}
