"""README promises that had no test of their own, each checked against an oracle written here:
the files the scripts write under the README's names, --help, --target, --transfer-from, the
sanity line's warnings, --select best-val, and that no training code reads
data/manifest.json. tests/README.md lists every promise and the test that guards it."""
import ast
import fnmatch
import json
import re
import shutil
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn
from PIL import Image

import adversarialExample as adv
import dataset
import gradient_masking
import models
import tester
import trainer
from attacks import fgsm_perturb
from conftest import ROOT, fgsm_by_hand, run_script, softmax_by_hand
from images import to_unit

PRETRAINED = ROOT / "checkpoints" / "pre_trained.ckpt"
ONE_THREAD = {"OMP_NUM_THREADS": "1"}
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: small models, one thread


# ---------------------------------------------------------------------------
# Every script with its defaults in a project folder: what it writes and prints


@pytest.fixture(scope="module")
def project(small_data, tmp_path_factory):
    """A project folder as the README's quick start leaves it: data/ (small real data), the shipped
    checkpoints/pre_trained.ckpt, and every script run with its default output folders."""
    root = tmp_path_factory.mktemp("project")
    shutil.copytree(small_data, root / "data")
    (root / "checkpoints").mkdir()
    shutil.copy(PRETRAINED, root / "checkpoints" / "pre_trained.ckpt")
    images, _ = dataset.load_pickle(small_data / "dev.pickle")
    (root / "my_photos").mkdir()
    for k in range(2):
        pixels = (to_unit(images[k]) * 255).round().byte().permute(1, 2, 0).numpy()
        Image.fromarray(pixels).save(root / "my_photos" / f"photo{k}.png")
    runs = {}
    for name, script, *args in [
        ("insights", "dataset.py", "insights"),
        ("train", "trainer.py", "--epochs", "2", "--fix-labels", "auto", "--repair-folds", "2", "--repair-epochs", "1"),
        ("sweep", "trainer.py", "--lr-sweep", "1e-3", "1", "--sweep-steps", "5"),
        ("test pre-trained", "tester.py"),
        ("test trained", "tester.py", "--checkpoint", "checkpoints/trained.ckpt", "--explain", "--mistakes", "4"),
        ("photos", "tester.py", "--checkpoint", "checkpoints/trained.ckpt", "--images", "my_photos"),
        ("attack", "adversarialExample.py", "--epsilons", "0", "0.03", "--examples", "2"),
        ("compare", "adversarialExample.py", "--compare", "checkpoints/trained.ckpt", "checkpoints/pre_trained.ckpt",
         "--epsilons", "0", "0.03"),
    ]:
        runs[name] = run_script(script, *args, cwd=root, env=ONE_THREAD, timeout=300)
        assert runs[name].returncode == 0, (name, runs[name].stderr)
    return root, runs


def output_mentions():
    """Every figures/... path the README and docs name, as a glob: <placeholder> and {a,b} expanded."""
    patterns = set()
    for doc in DOCS:
        for mention in re.findall(r"figures/(?:[A-Za-z0-9_<>*./-]|\{[a-z,]+\})+", doc.read_text()):
            mention = re.sub(r"<[^>]+>", "*", mention.rstrip("."))
            alternatives = re.search(r"\{([a-z,]+)\}", mention)
            for choice in alternatives[1].split(",") if alternatives else [None]:
                patterns.add(mention.replace(alternatives[0], choice) if choice else mention)
    return patterns


def test_readme_output_names_are_the_files_the_scripts_write(project):
    root, _ = project
    written = {p.relative_to(root).as_posix() for p in (root / "figures").rglob("*") if p.is_file()}
    mentioned = output_mentions()
    assert "figures/fgsm_accuracy.png" in mentioned and len(mentioned) > 15  # the parse found the README's names
    for pattern in sorted(mentioned):
        if pattern.endswith("/"):  # a folder: it exists and holds files
            assert any(w.startswith(pattern) for w in written), f"the docs name {pattern}, no run writes into it"
        else:
            assert fnmatch.filter(written, pattern), f"the docs name {pattern}, which no script writes"
    for name in sorted(written):  # and every file a run writes is named in the docs
        assert any(fnmatch.fnmatch(name, p) for p in mentioned if not p.endswith("/")), \
            f"{name} is written but the README and docs never name it"
    for doc in DOCS:  # the images the README and docs show are in the repository
        for image in re.findall(r'(?:src="|\]\()([A-Za-z0-9_./-]+\.png)', doc.read_text()):
            assert (doc.parent / image).is_file(), f"{doc.name} shows {image}, which is not there"


def test_trainer_writes_a_course_checkpoint_and_reports_each_epoch_on_one_line(project):
    root, runs = project
    checkpoint = torch.load(root / "checkpoints" / "trained.ckpt", weights_only=True)
    assert set(checkpoint) == {"model_state_dict"}  # the course format
    course = models.SimpleModel()
    course.load_state_dict(checkpoint["model_state_dict"])
    summary = json.loads((root / "figures" / "training.json").read_text())
    assert summary["checkpoint"] == "checkpoints/trained.ckpt" and len(summary["history"]) == 2
    # "Each epoch prints the loss and dev per-class and balanced accuracy (one line per epoch
    # when stderr is not a terminal)".
    epochs = [line for line in runs["train"].stderr.splitlines() if line.startswith("epoch ")]
    assert len(epochs) == 2 and "\r" not in runs["train"].stderr
    for line, record in zip(epochs, summary["history"]):
        dev = record["dev"]
        assert f"loss {record['loss']:.4f}" in line and f"balanced {dev['balanced_accuracy']:.4f}" in line
        assert all(f"{name} {dev['per_class'][name]['accuracy']:.3f}" in line for name in dataset.CLASSES)
    # The checkpoint is what tester.py scores, with the numbers the training run reported, and
    # the numbers are the checkpoint's own (computed here from its weights).
    tested = json.loads((root / "figures" / "metrics_trained.json").read_text())
    assert tested["balanced_accuracy"] == pytest.approx(summary["final_dev"]["balanced_accuracy"])
    dev_x, dev_y = dataset.load_pickle(root / "data" / "dev.pickle")
    predicted = softmax_by_hand(course, dev_x).argmax(1)
    assert tested["confusion_matrix"] == [[int(((dev_y == t) & (predicted == p)).sum()) for p in range(3)]
                                          for t in range(3)]
    # Label repair ran and said what it did; --explain drew Grad-CAM beside the 4 mistakes.
    assert "Label repair:" in runs["train"].stderr
    assert len(json.loads((root / "figures" / "label_issues.json").read_text())["issues"]) >= 1
    assert len(tested["mistakes"]) == 4


def test_the_shipped_model_and_the_default_tester_run(project):
    root, runs = project
    record = json.loads((root / "figures" / "metrics_pre_trained.json").read_text())
    assert (record["checkpoint"], record["data"], record["tta"]) == ("checkpoints/pre_trained.ckpt",
                                                                     "data/dev.pickle", "none")
    assert "balanced accuracy" in runs["test pre-trained"].stdout
    photos = json.loads((root / "figures" / "predictions.json").read_text())
    assert [Path(p["path"]).name for p in photos["predictions"]] == ["photo0.png", "photo1.png"]


def test_the_shipped_model_is_this_projects_code_with_everything_off(default_data, tmp_path):
    # README: "The pre-trained model is this project's own code run with everything that helps turned
    # off (python trainer.py --epochs 1 --lr 1e-5 --schedule constant --sampler none --no-augment
    # --fix-labels none): it predicts "car" for all 1,750 dev images." The same weights to within
    # 5e-5 (other arithmetic: thread count, CPU), where training moves them by up to 3e-3.
    args = trainer.parse_args(["--epochs", "1", "--lr", "1e-5", "--schedule", "constant", "--sampler", "none",
                               "--no-augment", "--fix-labels", "none", "--out", str(tmp_path / "m.ckpt"),
                               "--figures", str(tmp_path)])
    trainer.train(*dataset.load_pickle(default_data / "train.pickle"), *dataset.load_pickle(default_data / "dev.pickle"),
                  args, "cpu")
    made = torch.load(tmp_path / "m.ckpt", weights_only=True)["model_state_dict"]
    shipped = torch.load(PRETRAINED, weights_only=True)["model_state_dict"]
    assert made.keys() == shipped.keys()
    assert max((made[k] - shipped[k]).abs().max().item() for k in made) < 2.5e-4
    assert json.loads((tmp_path / "training.json").read_text())["final_dev"]["predicted_counts"] == \
        {"car": 1750, "truck": 0, "cat": 0}


# ---------------------------------------------------------------------------
# --help for every script, listing the flags the README uses

HELP = {"tester.py": ["tester.py"], "trainer.py": ["trainer.py"], "adversarialExample.py": ["adversarialExample.py"],
        "dataset.py build": ["dataset.py", "build"], "dataset.py insights": ["dataset.py", "insights"]}


def readme_commands():
    """(script, flags) for every command line in the README's code blocks."""
    commands = []
    for line in (ROOT / "README.md").read_text().replace("\\\n", " ").splitlines():
        match = re.match(r"\s{4}(?:[A-Z0-9_]+=\S+ )?(?:python|torchrun .*?) (\S+\.py)(?: (build|insights))?(.*)", line)
        if match and not match[1].startswith("bench/"):
            script = f"{match[1]} {match[2]}" if match[2] else match[1]
            commands.append((script, re.findall(r"(?<!\S)--[a-z][a-z-]*", match[3].split("#")[0])))
    return commands


def test_every_script_has_help_listing_its_flags(tmp_path):
    helps = {}
    for name, command in HELP.items():
        result = run_script(command[0], *command[1:], "--help", cwd=tmp_path, timeout=60)
        assert result.returncode == 0 and result.stderr == "", (name, result.stderr)
        assert result.stdout.startswith("usage:"), name
        helps[name] = set(re.findall(r"(?<![\w-])--[a-z][a-z-]*", result.stdout))
        assert "--help" in helps[name]
    assert list(tmp_path.iterdir()) == []  # --help writes nothing
    for script in ("tester.py", "trainer.py", "adversarialExample.py"):  # "takes --device cpu|cuda|cuda:N|mps"
        assert "--device" in helps[script]
    commands = readme_commands()
    assert len(commands) > 20  # the README's command lines were found
    for script, flags in commands:
        missing = set(flags) - helps[script]
        assert not missing, f"the README runs {script} with {sorted(missing)}, which its --help does not list"
    # Every flag the README names in its text is some script's.
    named = set(re.findall(r"`(--[a-z][a-z-]*)", (ROOT / "README.md").read_text()))
    assert len(named) >= 30 and not named - set().union(*helps.values()), named - set().union(*helps.values())


# ---------------------------------------------------------------------------
# adversarialExample.py --target and --transfer-from, against FGSM written out here


def attack_run(model_ckpt, data, out, *flags):
    result = run_script("adversarialExample.py", "--checkpoint", model_ckpt, "--data", data, "--out", out, *flags,
                        cwd=out.parent, env=ONE_THREAD, timeout=300)
    assert result.returncode == 0, result.stderr
    return result, json.loads((out / "adversarial.json").read_text())


def test_target_cat_pushes_cars_and_trucks_towards_cat(briefly_trained, small_data, tmp_path):
    model, ckpt, x, y = briefly_trained
    result, report = attack_run(ckpt, small_data / "dev.pickle", tmp_path / "out", "--target", "cat",
                                "--epsilons", "0", "0.03", "0.1", "--examples", "3")
    cat = dataset.CLASSES.index("cat")
    attacked = (softmax_by_hand(model, x).argmax(1) == y) & (y != cat)  # correctly classified cars and trucks
    assert report["target"] == "cat" and report["attacked_images"] == int(attacked.sum()) > 50
    rows = report["results"]["fgsm"]
    assert [r["epsilon"] for r in rows] == [0, 0.03, 0.1]
    for row in rows:
        pushed = softmax_by_hand(model, fgsm_by_hand(model, x[attacked], y[attacked], row["epsilon"], cat)).argmax(1)
        assert row["target_success"] == pytest.approx(float((pushed == cat).float().mean()), abs=1.5 / len(pushed))
        assert sum(row["flips"]["cat"].values()) == 0  # no cat is attacked
    assert rows[0]["target_success"] == 0 and rows[2]["target_success"] > rows[1]["target_success"] > 0.1
    assert {e["true"] for e in report["examples"]} <= {"car", "truck"} and len(report["examples"]) == 3
    assert "(those whose true class is not cat)" in result.stdout and "→ cat" in result.stdout
    assert "sanity:" not in result.stdout  # the masking checks are for untargeted attacks


def test_transfer_from_attacks_with_the_other_models_gradients(briefly_trained, small_data, tmp_path):
    model, ckpt, x, y = briefly_trained
    source = models.load_model(PRETRAINED)
    result, report = attack_run(ckpt, small_data / "dev.pickle", tmp_path / "out", "--transfer-from", PRETRAINED,
                                "--epsilons", "0", "0.03", "0.1", "--examples", "0")
    assert report["transfer_from"] == str(PRETRAINED) and report["titles"]["transfer"] == "transfer from pre_trained"
    right = softmax_by_hand(model, x).argmax(1) == y
    xa, ya = x[right], y[right]
    for transfer, white_box in zip(report["results"]["transfer"], report["results"]["fgsm"]):
        crafted = fgsm_by_hand(source, xa, ya, transfer["epsilon"])  # made on the other model ...
        still = softmax_by_hand(model, crafted).argmax(1) == ya  # ... scored on this one
        assert transfer["accuracy_attacked_this_epsilon"] == pytest.approx(float(still.float().mean()), abs=1.5 / len(ya))
    # The other model's attack is a different attack: far weaker here than the model's own.
    assert report["results"]["transfer"][1]["accuracy_attacked"] > report["results"]["fgsm"][1]["accuracy_attacked"] + 0.2
    assert "transfer from pre_trained" in result.stdout and "sanity:" in result.stdout


# ---------------------------------------------------------------------------
# The sanity line: "PGD no stronger than FGSM" and "accuracy rising with ε"


def test_sanity_line_warns_when_pgd_is_weaker_than_fgsm_and_not_on_a_normal_run(briefly_trained, small_data, tmp_path):
    # One PGD step of 1/10,000 of the pixel range barely moves an image: PGD far weaker than FGSM.
    _, ckpt, _, _ = briefly_trained
    weak, report = attack_run(ckpt, small_data / "dev.pickle", tmp_path / "weak", "--attack", "pgd", "--steps", "1",
                              "--step-size", "0.0001", "--epsilons", "0", "0.03", "0.1", "--examples", "0")
    assert report["results"]["pgd"][1]["accuracy_attacked_this_epsilon"] > \
        report["results"]["fgsm"][1]["accuracy_attacked_this_epsilon"] + 0.2  # the situation is there
    sanity = [line for line in weak.stdout.splitlines() if line.startswith("sanity:")]
    assert sanity == [report["sanity"]]
    assert sanity[0].startswith("sanity: WARNING, possible gradient masking (do not trust these robust numbers): ")
    assert "PGD-1 is weaker than FGSM at ε = 0.03, 0.1" in sanity[0]
    normal, report = attack_run(ckpt, small_data / "dev.pickle", tmp_path / "normal", "--attack", "pgd", "--steps",
                                "5", "--epsilons", "0", "0.03", "0.1", "--examples", "0")
    assert report["sanity"].startswith("sanity: no sign of gradient masking: PGD-5 at least as strong as FGSM at "
                                       "every ε")
    assert "WARNING" not in normal.stdout and "weaker" not in normal.stdout


class Periodic(nn.Module):
    """A model whose answer comes back as FGSM pushes harder: class 0's logit is cos(2π·m/0.8) of
    the image's mean pixel m, class 1's its negative. From m = 0.1, FGSM raises m by 2ε: the
    answer is right for ε < 0.05, wrong up to ε = 0.25, right again beyond."""

    def forward(self, x):
        score = torch.cos(2 * torch.pi * x.mean((1, 2, 3)) / 0.8)
        return torch.stack([score, -score, torch.full_like(score, -2.0)], 1)


def test_sanity_line_warns_when_accuracy_rises_with_epsilon_and_not_on_a_normal_model(briefly_trained):
    x, y = torch.full((6, 3, 32, 32), 0.1), torch.zeros(6, dtype=torch.long)
    titles = {"fgsm": "FGSM", "pgd": "PGD-10"}
    summary, _ = adv.evaluate(Periodic(), {"fgsm": fgsm_perturb}, x, y, [0, 0.1, 0.3], 10, "cpu", progress=False)
    assert [r["accuracy_attacked_this_epsilon"] for r in summary["results"]["fgsm"]] == [1, 0, 1]
    assert [r["accuracy_attacked"] for r in summary["results"]["fgsm"]] == [1, 0, 0]  # the worst case never rises
    line = gradient_masking.sanity_line(summary, titles)
    assert line == ("sanity: WARNING, possible gradient masking (do not trust these robust numbers): FGSM leaves "
                    "more images correct at ε = 0.3 than at ε = 0.1")
    model, _, dev_x, dev_y = briefly_trained
    plain, _ = adv.evaluate(model, {"fgsm": fgsm_perturb}, dev_x, dev_y, [0, 0.01, 0.03, 0.3], 250, "cpu",
                            progress=False)
    line = gradient_masking.sanity_line(plain, titles)
    assert line.startswith("sanity: no sign of gradient masking") and "more images correct" not in line


def sweep(fgsm_this_epsilon, worst):
    eps = [0, 0.1, 0.2, 0.3]
    return {"results": {"fgsm": [{"epsilon": e, "accuracy_attacked_this_epsilon": a, "accuracy_attacked": w}
                                 for e, a, w in zip(eps, fgsm_this_epsilon, worst)]}}


def test_sanity_line_calls_a_rise_masking_only_when_it_ends_above_a_tenth_of_the_images():
    # A plain model's FGSM at large ε (as the default quick start measured it): 1.8 % correct at 0.2,
    # 2.9 % at 0.3. The single large step overshoots; no robust number is inflated.
    overshoot = sweep([1.0, 0.023, 0.018, 0.029], [1.0, 0.021, 0.003, 0.002])
    assert gradient_masking.sanity_line(overshoot, {"fgsm": "FGSM"}) == (
        "sanity: no sign of gradient masking: FGSM rises from 1.8% at ε = 0.2 to 2.9% at ε = 0.3, under 10%: a large "
        "single step's overshoot; 0.2% left at ε = 0.3")
    # The same rise ending at 12 % of the images is a sign of masking.
    masked = sweep([1.0, 0.023, 0.018, 0.12], [1.0, 0.021, 0.003, 0.002])
    assert gradient_masking.masking_checks(masked, {"fgsm": "FGSM"})[0] == [
        "FGSM leaves more images correct at ε = 0.3 than at ε = 0.2"]


# ---------------------------------------------------------------------------
# --select best-val keeps the epoch the recorded history says is best, with its weights


def test_select_best_val_keeps_the_best_recorded_epoch_and_its_weights(small_data, tmp_path, monkeypatch):
    snapshots, trained_on = [], []
    real_epoch = trainer.run_epoch

    def epoch_then_snapshot(model, optimizer, scheduler, images, *args, **kwargs):
        trained_on.append(images)
        losses = real_epoch(model, optimizer, scheduler, images, *args, **kwargs)
        snapshots.append({k: v.detach().clone() for k, v in model.state_dict().items()})
        return losses

    monkeypatch.setattr(trainer, "run_epoch", epoch_then_snapshot)
    args = trainer.parse_args(["--epochs", "6", "--fix-labels", "none", "--val-fraction", "0.2", "--select", "best-val",
                               "--out", str(tmp_path / "m.ckpt"), "--figures", str(tmp_path)])
    trainer.train(*dataset.load_pickle(small_data / "train.pickle"), *dataset.load_pickle(small_data / "dev.pickle"),
                  args, "cpu")
    summary = json.loads((tmp_path / "training.json").read_text())
    val = [h["val"]["balanced_accuracy"] for h in summary["history"]]
    best = val.index(max(val))  # the first epoch with the highest validation score
    assert len(val) == len(snapshots) == 6 and best != 5, val  # "last" would keep another epoch
    assert summary["selected_epoch"] == best + 1
    assert summary["final_dev"] == summary["history"][best]["dev"]
    kept = torch.load(tmp_path / "m.ckpt", weights_only=True)["model_state_dict"]
    for key, value in kept.items():
        assert torch.equal(value, snapshots[best][key]), key
    assert any(not torch.equal(kept[k], snapshots[-1][k]) for k in kept)
    # The validation images are held out: the epochs train on the other 80 %, each image once.
    assert summary["history"][0]["val"]["n"] == 112
    assert all(len(images) == 560 - 112 == len(torch.unique(images.flatten(1), dim=0)) for images in trained_on)


def test_ema_evaluates_and_saves_the_average_of_the_weights(small_data, tmp_path):
    # --ema DECAY: "evaluate and save an average of the weights" (Polyak averaging), not the raw ones.
    args = trainer.parse_args(["--epochs", "1", "--batch-size", "64", "--fix-labels", "none", "--ema", "0.9",
                               "--out", str(tmp_path / "m.ckpt"), "--figures", str(tmp_path)])
    dev_x, dev_y = dataset.load_pickle(small_data / "dev.pickle")
    trainer.train(*dataset.load_pickle(small_data / "train.pickle"), dev_x, dev_y, args, "cpu")
    state = torch.load(tmp_path / "m.resume.pt", weights_only=True)
    kept = torch.load(tmp_path / "m.ckpt", weights_only=True)["model_state_dict"]
    assert all(torch.equal(kept[k], state["average"][k]) for k in kept)
    assert any(not torch.equal(kept[k], state["model"][k]) for k in kept)
    # The dev scores reported are the saved (averaged) model's.
    averaged = models.SimpleModel()
    averaged.load_state_dict(kept)
    reported = json.loads((tmp_path / "training.json").read_text())["final_dev"]["balanced_accuracy"]
    predicted = softmax_by_hand(averaged, dev_x).argmax(1)
    per_class = [float((predicted[dev_y == c] == c).float().mean()) for c in range(3)]
    assert reported == pytest.approx(sum(per_class) / 3)


# ---------------------------------------------------------------------------
# "data/manifest.json records which training labels are wrong ...; no training code reads it"

opened = []


def _record_opens(event, args):
    if event == "open" and opened and isinstance(args[0], (str, bytes, Path)):
        opened.append(Path(args[0].decode() if isinstance(args[0], bytes) else args[0]).name)




def manifest_names(path):
    """The places in a module's code (not its docstrings) that name the manifest: string constants
    holding "manifest" and uses of dataset.MANIFEST_NAME, by enclosing function."""
    tree = ast.parse(path.read_text())
    docstrings = {id(node.body[0].value) for node in ast.walk(tree)
                  if isinstance(node, (ast.Module, ast.FunctionDef, ast.ClassDef)) and node.body
                  and isinstance(node.body[0], ast.Expr) and isinstance(node.body[0].value, ast.Constant)}
    found = []

    def visit(node, function):
        for child in ast.iter_child_nodes(node):
            inner = child.name if isinstance(child, ast.FunctionDef) else function
            if isinstance(child, ast.Constant) and isinstance(child.value, str) and id(child) not in docstrings \
                    and "manifest" in child.value.lower():
                found.append(function)
            elif (isinstance(child, ast.Name) and child.id == "MANIFEST_NAME") or \
                    (isinstance(child, ast.Attribute) and child.attr == "MANIFEST_NAME"):
                found.append(function)
            visit(child, inner)

    visit(tree, None)
    return found


def test_no_training_code_reads_the_manifest(small_data, tmp_path, monkeypatch):
    # In the code: only dataset.py names the manifest, where the build writes it (and in --help texts).
    for module in sorted(ROOT.glob("*.py")):
        places = manifest_names(module)
        if module.name == "dataset.py":
            assert set(places) <= {"build_from_cifar", None, "parse_args"} and "build_from_cifar" in places, places
        else:
            assert places == [], f"{module.name} names the manifest in {places}"
    # In a run: training with label repair on data whose manifest lies beside it opens it never.
    assert (small_data / "manifest.json").is_file()
    if not getattr(_record_opens, "installed", False):  # a hook cannot be removed: idle unless a test asks
        sys.addaudithook(_record_opens)
        _record_opens.installed = True
    opened[:] = ["(recording)"]
    try:
        (small_data / "manifest.json").read_text()  # the recorder sees a read ...
        assert opened[-1] == "manifest.json"
        opened[:] = ["(recording)"]
        monkeypatch.setattr(sys, "argv", ["trainer.py", "--data", str(small_data / "train.pickle"), "--dev-data",
                                          str(small_data / "dev.pickle"), "--epochs", "1", "--fix-labels", "auto",
                                          "--repair-folds", "2", "--repair-epochs", "1", "--out", str(tmp_path / "m.ckpt"),
                                          "--figures", str(tmp_path)])
        trainer.main()
        tester.main(["--checkpoint", str(tmp_path / "m.ckpt"), "--data", str(small_data / "dev.pickle"), "--out",
                     str(tmp_path)])
        names = opened[1:]
    finally:
        opened.clear()
    assert "train.pickle" in names and "dev.pickle" in names  # ... and the runs' own reads
    assert "manifest.json" not in names
    assert (tmp_path / "label_issues.json").is_file()  # repair ran
