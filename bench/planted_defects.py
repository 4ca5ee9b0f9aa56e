"""Does the test suite notice when the product breaks? Plant small, realistic defects, one at a time.

    python bench/planted_defects.py                    # every defect; a table of caught / missed
    python bench/planted_defects.py --list             # the defects, their files and the tests that should notice
    python bench/planted_defects.py --only tta-wrong-axis recipe-lr
    python bench/planted_defects.py --skip-clean       # without the first run on the unchanged copy

The repository's files (those git tracks, and new ones it does not ignore, as they are in
the working tree) are copied to a scratch folder; the checkout itself is never changed. Each
defect is one exact text substitution in one file of that copy: if its text is not there
exactly as often as expected the bench stops before running anything, so a defect whose
code has moved fails loudly instead of silently planting nothing. For each defect the copy
gets the substitution, the test files named for it run (pytest -x, REQUIRE_ALL_TESTS=1, so a
skip cannot pass for a pass), and the file is put back. A defect is caught when those tests
fail. First, unless --skip-clean, the union of all the selected tests runs on the unchanged
copy: a selection that fails without any defect would catch everything and mean nothing.

Exit status: 0 when every defect run was caught, 1 when one was missed, 2 when the clean
run failed or a defect's text was not found.
"""
import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def defect(name, path, old, new, tests, count=1, why=""):
    """One planted defect: replace `old` by `new` in `path` (exactly `count` occurrences must be
    there); `tests` are pytest arguments (files, node ids, -k expressions) that should fail."""
    return {"name": name, "path": path, "old": old, "new": new, "tests": tests, "count": count, "why": why}


# The quick tests first: -x stops at the first failure, before the default-data repair (half a minute) if it can.
REPAIR_TESTS = ["tests/test_trainer.py", "tests/test_label_repair.py", "-k", "repair or directional"]
AUGMENT_TESTS = ["tests/test_recipe.py", "-k", "augment"]
RECIPE_TESTS = ["tests/test_recipe.py", "-k", "recipe or schedule or optimizer"]

DEFECTS = [
    # --- label repair (label_repair.py)
    defect("repair-acts-on-nothing", "label_repair.py",
           "act = torch.tensor([not w for w in why], dtype=torch.bool)",
           "act = torch.zeros(len(why), dtype=torch.bool)", REPAIR_TESTS,
           why="flags are found and reported, none is acted on"),
    defect("repair-filter-wrong-direction", "label_repair.py",
           "return (flags > 0) & (rate >= factor * rate.T) & (flags >= factor * flags.T)",
           "return (flags > 0) & (rate.T >= factor * rate) & (flags.T >= factor * flags)", REPAIR_TESTS,
           why="the one-way filter keeps the reverse pairs"),
    defect("repair-filter-off", "label_repair.py",
           "one_way = directional_pairs(labels[issues], suggested, torch.tensor(class_counts(labels)))",
           "one_way = torch.ones(len(CLASSES), len(CLASSES), dtype=torch.bool)", REPAIR_TESTS,
           why="every pair counts as one-way noise"),
    defect("repair-prior-check-off", "label_repair.py",
           "agrees = prior_calibrated(probs, labels)[issues].argmax(1) == suggested",
           "agrees = torch.ones(len(issues), dtype=torch.bool)", REPAIR_TESTS,
           why="the balanced prior alone decides (relabels into the rare class)"),
    defect("repair-drops-instead-of-relabels", "label_repair.py",
           'if args.repair_action == "relabel":\n        labels[fix] = to',
           'if args.repair_action == "drop":\n        labels[fix] = to', REPAIR_TESTS,
           why="--repair-action relabel drops the images"),
    defect("repair-fold-models-see-held-out", "label_repair.py",
           'model = train_fold(images[train_idx], labels[train_idx], f"fold{k + 1}")',
           'model = train_fold(images, labels, f"fold{k + 1}")', REPAIR_TESTS,
           why="out-of-fold probabilities from models that trained on the image"),
    # --- test-time augmentation (models.predict)
    defect("tta-wrong-axis", "models.py", "p = (p + model(x.flip(3)).softmax(1)) / 2",
           "p = (p + model(x.flip(2)).softmax(1)) / 2",
           ["tests/test_tester.py", "tests/test_own_photos.py", "-k", "tta or mixed_formats"],
           why="flip TTA mirrors top to bottom"),
    defect("tta-averages-logits", "models.py",
           "p = logits.softmax(1)\n            if flip:\n                p = (p + model(x.flip(3)).softmax(1)) / 2",
           "p = logits.softmax(1)\n            if flip:\n                p = ((logits + model(x.flip(3))) / 2).softmax(1)",
           ["tests/test_tester.py", "tests/test_own_photos.py", "-k", "tta or mixed_formats"],
           why="the mean of the logits, not of the probabilities"),
    defect("tta-on-by-default", "tester.py", 'parser.add_argument("--tta", choices=("none", "flip"), default="none",',
           'parser.add_argument("--tta", choices=("none", "flip"), default="flip",',
           ["tests/test_tester.py", "-k", "default_run"], why="flip averaging without being asked"),
    # --- the default recipe (trainer.py)
    defect("recipe-lr", "trainer.py", 'dict(epochs=60, lr=1e-3, batch_size=32, optimizer="adam"',
           'dict(epochs=60, lr=2e-3, batch_size=32, optimizer="adam"', RECIPE_TESTS),
    defect("recipe-epochs", "trainer.py", 'dict(epochs=60, lr=1e-3, batch_size=32, optimizer="adam"',
           'dict(epochs=50, lr=1e-3, batch_size=32, optimizer="adam"', RECIPE_TESTS),
    defect("recipe-batch-size", "trainer.py", 'dict(epochs=60, lr=1e-3, batch_size=32, optimizer="adam"',
           'dict(epochs=60, lr=1e-3, batch_size=64, optimizer="adam"', RECIPE_TESTS),
    defect("recipe-pct-start", "trainer.py", "pct_start=0.15", "pct_start=0.3", RECIPE_TESTS),
    defect("recipe-anneal-linear", "trainer.py", 'anneal_strategy="cos"', 'anneal_strategy="linear"', RECIPE_TESTS),
    defect("recipe-schedule-default", "trainer.py",
           'choices=("constant", "cosine", "onecycle"), default="onecycle"',
           'choices=("constant", "cosine", "onecycle"), default="cosine"', RECIPE_TESTS),
    defect("recipe-sgd", "trainer.py", 'if args.optimizer == "adam":', 'if args.optimizer == "adamw":', RECIPE_TESTS,
           why="the recipe says adam, the optimizer built is SGD"),
    defect("recipe-fix-labels-default", "label_repair.py", 'group.add_argument("--fix-labels", default="none"',
           'group.add_argument("--fix-labels", default="auto"', RECIPE_TESTS),
    defect("augment-off-by-default", "trainer.py",
           'parser.add_argument("--augment", action=argparse.BooleanOptionalAction, default=True,',
           'parser.add_argument("--augment", action=argparse.BooleanOptionalAction, default=False,', RECIPE_TESTS),
    # --- augmentation bounds (trainer.augment_batch)
    defect("augment-rotation-loosened", "trainer.py", "max_degrees=10.0", "max_degrees=15.0", AUGMENT_TESTS),
    defect("augment-rotation-radians", "trainer.py", "angle = uniform(-max_degrees, max_degrees) * (math.pi / 180)",
           "angle = uniform(-max_degrees, max_degrees) * (math.pi / 360)", AUGMENT_TESTS,
           why="degrees converted wrongly: at most 5 degrees"),
    defect("augment-shift-loosened", "trainer.py", "max_shift=0.1,", "max_shift=0.15,", AUGMENT_TESTS),
    defect("augment-shift-halved", "trainer.py", "shift = uniform(-2 * max_shift, 2 * max_shift, 2)",
           "shift = uniform(-max_shift, max_shift, 2)", AUGMENT_TESTS, why="±5 % instead of ±10 %"),
    defect("augment-jitter-loosened", "trainer.py", "jitter=0.2)", "jitter=0.3)", AUGMENT_TESTS),
    defect("augment-brightness-one-sided", "trainer.py", "brightness = uniform(1 - jitter, 1 + jitter, 1, 1, 1)",
           "brightness = uniform(1, 1 + jitter, 1, 1, 1)", AUGMENT_TESTS),
    defect("augment-never-flips", "trainer.py", "flip = torch.where(uniform(0, 1) < 0.5, -1.0, 1.0)",
           "flip = torch.where(uniform(0, 1) < 0.0, -1.0, 1.0)", AUGMENT_TESTS),
    # --- the balanced sampler
    defect("sampler-sqrt-weights", "trainer.py", "return 1.0 / counts[labels]", "return 1.0 / counts[labels].sqrt()",
           ["tests/test_trainer.py", "tests/test_recipe.py", "-k", "sampler or balanced"]),
    defect("sampler-uniform-weights", "trainer.py", "return 1.0 / counts[labels]",
           "return torch.ones(len(labels), dtype=torch.double)",
           ["tests/test_trainer.py", "tests/test_recipe.py", "-k", "sampler or balanced"]),
    defect("sampler-without-replacement", "trainer.py",
           "draws = WeightedRandomSampler(sampler_weights(labels, sampler), len(labels), replacement=True,",
           "draws = WeightedRandomSampler(sampler_weights(labels, sampler), len(labels), replacement=False,",
           ["tests/test_trainer.py", "tests/test_recipe.py", "-k", "sampler or balanced"]),
    # --- metrics
    defect("balanced-accuracy-is-accuracy", "metrics.py",
           "shares = [correct[y_true == c].sum() / (y_true == c).sum() for c in LABELS if (y_true == c).any()]",
           "shares = [correct.mean()]", ["tests/test_metrics.py"]),
    defect("ece-ten-bins", "metrics.py", "def calibration(y_true, y_pred, probabilities, bins=CALIBRATION_BINS):",
           "def calibration(y_true, y_pred, probabilities, bins=10):", ["tests/test_metrics.py"]),
    # --- attacks
    defect("fgsm-sign-flipped", "attacks.py", "delta = (delta + step * sign * grad.sign()).clamp(-radius, radius)",
           "delta = (delta - step * sign * grad.sign()).clamp(-radius, radius)",
           ["tests/test_adversarial.py", "-k", "not script and not missing_checkpoint"]),
    defect("epsilon-not-scaled", "attacks.py",
           "EPS_SCALE = float(from_unit(torch.tensor(1.0)) - from_unit(torch.tensor(0.0)))", "EPS_SCALE = 1.0",
           ["tests/test_adversarial.py", "-k", "not script and not missing_checkpoint"]),
    defect("pgd-no-projection", "attacks.py", "delta = (delta + step * sign * grad.sign()).clamp(-radius, radius)",
           "delta = delta + step * sign * grad.sign()", ["tests/test_adversarial.py", "-k", "pgd"]),
    defect("attack-no-clamp", "attacks.py", "delta = (x + delta).clamp(-1, 1) - x\n    return x + delta",
           "return x + delta", ["tests/test_adversarial.py", "-k", "fgsm_matches"]),
    defect("targeted-attack-untargeted-direction", "attacks.py",
           'goal, sign = (labels, 1) if target is None else (target, -1)',
           'goal, sign = (labels, 1) if target is None else (target, 1)',
           ["tests/test_adversarial.py", "-k", "target"]),
    defect("transfer-uses-own-gradients", "attacks.py", "return attack(source, images, labels, epsilon, target=target)",
           "return attack(model, images, labels, epsilon, target=target)",
           ["tests/test_promises.py", "-k", "transfer"]),
    defect("robust-not-monotone", "adversarialExample.py",
           "broken = success | broken_at[(name, smaller[-1])] if smaller else success", "broken = success",
           ["tests/test_robustness.py", "tests/test_promises.py", "-k", "sweep or rises"],
           why="robust accuracy at ε no longer counts the images broken at a smaller ε"),
    defect("attacks-wrong-images", "adversarialExample.py",
           "attacked = correct if target is None else correct & (labels != target)",
           "attacked = correct if target is None else correct.clone()",
           ["tests/test_promises.py", "-k", "target"], why="--target attacks the target class's own images too"),
    defect("sanity-pgd-weaker-never-fires", "gradient_masking.py",
           'if p["accuracy_attacked_this_epsilon"] > f["accuracy_attacked_this_epsilon"] + TOLERANCE]',
           'if p["accuracy_attacked_this_epsilon"] > f["accuracy_attacked_this_epsilon"] + 1]',
           ["tests/test_promises.py", "-k", "sanity"]),
    defect("sanity-rise-never-fires", "gradient_masking.py", "if raw[i + 1] > raw[i] + TOLERANCE]",
           "if raw[i + 1] > raw[i] + 1]", ["tests/test_promises.py", "-k", "sanity"]),
    defect("sanity-rise-any-size", "gradient_masking.py", "masking = [i for i in rises if raw[i + 1] > SURVIVORS]",
           "masking = rises", ["tests/test_promises.py", "-k", "sanity"],
           why="a plain model's FGSM overshoot at large ε called gradient masking"),
    defect("sanity-rise-limit-raised", "gradient_masking.py", "masking = [i for i in rises if raw[i + 1] > SURVIVORS]",
           "masking = [i for i in rises if raw[i + 1] > 0.5]", ["tests/test_promises.py", "-k", "sanity"],
           why="a rise to 40 % of the images goes unflagged"),
    defect("catastrophic-overfitting-blind", "attacks.py",
           'collapsed = robust["pgd"] <= max(0.05, 0.25 * best)', 'collapsed = robust["pgd"] <= 0.0',
           ["tests/test_robustness.py", "-k", "catastrophic_overfitting_detector"]),
    # --- file names and messages
    defect("panel-file-renamed", "adversarial_figures.py", 'stem = out_dir / f"example{k}_{ex[\'true\']}"',
           'stem = out_dir / f"sample{k}_{ex[\'true\']}"', ["tests/test_promises.py", "-k", "readme"],
           why="the README's figure names no longer what is written"),
    defect("image-message-drops-file-name", "images.py", 'super().__init__(f"{path}: {problem} ({advice})")',
           'super().__init__(f"{problem} ({advice})")',
           ["tests/test_own_photos.py", "-k", "bad_file_is_refused_in_one_line"]),
    defect("data-message-drops-file-name", "dataset.py", 'where = f"{path}: item {i}"', 'where = f"item {i}"',
           ["tests/test_dataset.py", "-k", "bad_item"]),
    # --- checkpoints, selection, resume
    defect("checkpoint-not-atomic", "models.py", "atomic_write(path, lambda f: torch.save(ckpt, f))",
           "torch.save(ckpt, path)", ["tests/test_models.py", "-k", "atomic"]),
    defect("best-val-keeps-last", "trainer.py",
           'improved = args.select == "best-val" and (best is None or val["balanced_accuracy"] > best["score"])',
           'improved = args.select == "best-val"', ["tests/test_promises.py", "-k", "best_val"]),
    defect("best-val-keeps-worst", "trainer.py",
           'improved = args.select == "best-val" and (best is None or val["balanced_accuracy"] > best["score"])',
           'improved = args.select == "best-val" and (best is None or val["balanced_accuracy"] < best["score"])',
           ["tests/test_promises.py", "-k", "best_val"]),
    defect("resume-skips-an-epoch", "resume_state.py", 'return state["history"], state["epoch"] + 1, average, state["best"]',
           'return state["history"], state["epoch"] + 2, average, state["best"]',
           ["tests/test_treatments.py", "-k", "resume"]),
    defect("validation-images-trained-on", "trainer.py", "images, labels = train_x[train_idx], all_labels[train_idx]",
           "images, labels = train_x[keep], all_labels[keep]", ["tests/test_promises.py", "-k", "best_val"],
           why="--val-fraction's held-out images are trained on too"),
    defect("ema-raw-weights-saved", "trainer.py", "scored = averaged_model(model, average)", "scored = model",
           ["tests/test_promises.py", "-k", "ema"], why="--ema averages but saves and scores the raw weights"),
    defect("restarts-ignored", "attacks.py", "for _ in range(restarts - 1):", "for _ in range(0):",
           ["tests/test_robustness.py", "-k", "sweep"], why="--restarts N runs the attack once"),
    # --- what the scripts print
    defect("attack-table-columns-swapped", "adversarialExample.py",
           "f\"{r['accuracy_dev']:>7.1%} | {r['balanced_dev']:>12.1%}\")",
           "f\"{r['balanced_dev']:>7.1%} | {r['accuracy_dev']:>12.1%}\")", ["tests/test_adversarial.py", "-k", "script"]),
    defect("top-losses-lowest-first", "metrics.py", "order = errors[np.lexsort((errors, -loss[errors]))][:k]",
           "order = errors[np.lexsort((errors, loss[errors]))][:k]", ["tests/test_metrics.py"]),
    defect("mistakes-default-20", "tester.py", "DEFAULT_MISTAKES = 24", "DEFAULT_MISTAKES = 20",
           ["tests/test_tester.py", "-k", "confused"]),
    defect("initialization-seed-changed", "trainer.py", 'seeded(args.seed, salt, "init")',
           'seeded(args.seed + 1, salt, "init")', ["tests/test_promises.py", "-k", "shipped_model_is"],
           why="the same command no longer reproduces the shipped model"),
    # --- photos, Grad-CAM, the learning-rate study, the command line
    defect("photo-crop-not-centred", "images.py", "left, top = (width - side) // 2, (height - side) // 2",
           "left, top = 0, 0", ["tests/test_own_photos.py", "-k", "aspect_ratio or exif"],
           why="the square is cut from the top-left corner"),
    defect("photo-exif-ignored", "images.py", "orientation = image.getexif().get(_EXIF_ORIENTATION, 1)",
           "orientation = 1", ["tests/test_own_photos.py", "-k", "exif"]),
    defect("grad-cam-not-rectified", "explain.py", "relu_attributions=True", "relu_attributions=False",
           ["tests/test_explain.py"]),
    defect("lr-sweep-never-diverges", "lr_sweep.py", "if exploded is not None and diverged is None:",
           "if False:", ["tests/test_recipe.py", "tests/test_trainer.py", "-k", "lr_sweep"],
           why="a loss that explodes but stays finite is not marked diverged"),
    defect("error-line-without-script-name", "cli.py", 'print(f"{prog}: error: {message}", file=sys.stderr)',
           'print(f"error: {message}", file=sys.stderr)', ["tests/test_tester.py", "-k", "error"]),
    defect("drw-never-switches", "treatments.py", 'return "none" if epoch < args.drw_start else args.sampler',
           'return "none" if args.drw_start else args.sampler', ["tests/test_treatments.py", "-k", "drw"]),
    defect("build-dev-overlaps-train", "dataset.py", "chosen_b.append(order[n_a : n_a + n_b])",
           "chosen_b.append(order[:n_b])", ["tests/test_dataset.py", "-k", "build"],
           why="dev images drawn from the training images"),
    # --- data
    defect("build-noise-into-truck", "dataset.py", 'train_given[flipped] = CLASSES.index("car")',
           'train_given[flipped] = CLASSES.index("truck")', ["tests/test_dataset.py", "-k", "build"],
           why="the planted noise labels cats truck, not car"),
    defect("build-dev-labels-noisy", "dataset.py", "dev_x, dev_true, _ = assemble(dev_pix, dev_idx)",
           "dev_x, dev_true, _ = assemble(dev_pix, dev_idx)\n    dev_true[:1] = (dev_true[:1] + 1) % 3",
           ["tests/test_dataset.py", "-k", "build"], why="one dev label wrong"),
    defect("training-reads-the-manifest", "trainer.py", "    train_x, train_y = load_pickle(args.data)\n",
           "    train_x, train_y = load_pickle(args.data)\n    _planted = (Path(args.data).parent / \"manifest.json\")\n"
           "    _planted.exists() and _planted.read_text()\n",
           ["tests/test_promises.py", "-k", "manifest"]),
    # --- imbalance treatments
    defect("logit-adjustment-sign", "treatments.py", "return F.cross_entropy(logits.float() + tau * log_prior.to(",
           "return F.cross_entropy(logits.float() - tau * log_prior.to(", ["tests/test_treatments.py", "-k", "logit or softmax"]),
    defect("ema-no-warmup", "treatments.py", "return min(args.ema, (1 + step) / (10 + step))", "return args.ema",
           ["tests/test_treatments.py", "-k", "ema"]),
    # --- any device (#28): devices.py, the training loop, resume across devices, locks, torchrun
    defect("loss-read-every-step", "trainer.py", "            chunk_losses.append(loss.detach())\n",
           "            chunk_losses.append(loss.detach())\n            loss.item()\n",
           ["tests/test_devices.py", "-k", "reads"], why="a host sync per step again"),
    defect("resume-compares-fused", "resume_state.py",
           'IMPLEMENTATION_FLAGS = {"foreach", "fused", "capturable", "differentiable"}',
           'IMPLEMENTATION_FLAGS = {"foreach", "capturable", "differentiable"}',
           ["tests/test_devices.py", "-k", "implementation_flags"], why="an MPS run's state refused on CUDA"),
    defect("resume-takes-saved-implementation", "resume_state.py",
           'optimizer.load_state_dict(implementation_as_this_run(state["optimizer"], optimizer))',
           'optimizer.load_state_dict(state["optimizer"])',
           ["tests/test_devices.py", "-k", "implementation_flags"], why="the saved run's kernel, not this run's"),
    defect("resume-ignores-arithmetic", "resume_state.py",
           "    problem = _mismatch(groups, arithmetic)\n    if problem:\n        return f\"param_groups {problem}\"\n"
           "    for group, fresh_group, expected in zip(groups, arithmetic, scheduled):\n"
           "        if any(group[k] != v for k, v in fresh_group.items() if k not in SCHEDULED):",
           "    problem = _mismatch(groups, arithmetic)\n    if problem:\n        return f\"param_groups {problem}\"\n"
           "    for group, fresh_group, expected in zip(groups, arithmetic, scheduled):\n"
           "        if False:",
           ["tests/test_devices.py", "-k", "arithmetic_setting"], why="a changed eps or amsgrad resumes silently"),
    defect("amp-not-a-resume-setting", "resume_state.py", '"amp", "deterministic")', '"deterministic")',
           ["tests/test_devices.py", "-k", "amp_run_without"]),
    defect("older-states-refused", "resume_state.py", "config = {**LATER_RUN_KEYS, **state[\"config\"]}",
           "config = dict(state[\"config\"])", ["tests/test_devices.py", "-k", "before_amp"],
           why="a state from before --amp existed no longer resumes"),
    defect("lock-left-behind", "cli.py", "        with contextlib.suppress(OSError):\n            lock_path.unlink()\n        f.close()",
           "        f.close()", ["tests/test_devices.py", "-k", "lock"]),
    defect("lock-without-recheck", "cli.py", "        if same:\n            break", "        if True:\n            break",
           ["tests/test_devices.py", "-k", "file_lock"], why="two holders once the file was removed and made anew"),
    defect("build-without-lock", "dataset.py", '    with file_lock(out_dir / ".build.lock"):',
           "    with open(os.devnull):", ["tests/test_devices.py", "-k", "build_it_once"]),
    defect("download-in-place", "dataset.py",
           "download_and_extract_archive(CIFAR10.url, tmp, filename=CIFAR10.filename, md5=CIFAR10.tgz_md5)",
           "download_and_extract_archive(CIFAR10.url, str(data_dir), filename=CIFAR10.filename, md5=CIFAR10.tgz_md5)",
           ["tests/test_devices.py", "-k", "download"], why="two downloads into one folder at once"),
    defect("data-check-off", "ddp.py", "    if size() == 1:\n        return\n    parts = [None] * size()",
           "    if True:\n        return\n    parts = [None] * size()",
           ["tests/test_distributed.py", "-k", "different_data"], why="machines with other data train on a mix"),
    defect("group-timeout-default", "ddp.py", "timeout=GROUP_TIMEOUT,\n                            device_id",
           "device_id", ["tests/test_devices.py", "-k", "30_minutes"], why="nccl's 10 minutes again"),
    defect("non-blocking-copy", "models.py", "x = images[start : start + batch_size].to(device)",
           "x = images[start : start + batch_size].to(device, non_blocking=True)",
           ["tests/test_devices.py", "-k", "non_blocking"]),
    defect("warp-swallows-errors", "devices.py", 'if device.type != "mps" or isinstance(e, torch.OutOfMemoryError):',
           "if False:", ["tests/test_devices.py", "-k", "off_mps"], why="an out-of-memory error moves the warp to the CPU"),
    defect("draws-fresh-on-cpu", "devices.py", '    if device.type == "cpu":\n        return generator',
           '    if False:\n        return generator', ["tests/test_devices.py", "-k", "draws_on or reads_do_not"],
           why="CPU runs draw other numbers than before"),
    defect("amp-on-by-default", "trainer.py", 'parser.add_argument("--amp", action="store_true",',
           'parser.add_argument("--amp", action="store_true", default=True,',
           ["tests/test_recipe.py", "tests/test_devices.py", "-k", "default_recipe or amp_is_opt_in"]),
    defect("amp-emulated-accepted", "devices.py", "if not torch.cuda.is_bf16_supported(including_emulation=False):",
           "if not torch.cuda.is_bf16_supported():", ["tests/test_devices.py", "-k", "emulated"]),
    defect("logit-adjust-in-bf16", "treatments.py",
           "logits.float() + tau * log_prior.to(logits.device), targets,",
           "logits + tau * log_prior.to(logits), targets,", ["tests/test_devices.py", "-k", "float32_under"]),
    defect("deterministic-pool-amax", "models.py", "return torch.flatten(F.max_pool2d(x, x.shape[-2:]), 1)",
           "return x.amax((2, 3))", ["tests/test_devices.py", "-k", "pooling"],
           why="ties share the gradient: other weights under --deterministic"),
    # --- everyday files (#27): the reading limits, checkpoint layouts, float64 images
    defect("instruction-limit-as-before", "restricted_pickle.py", "INSTRUCTION_BYTES = 32", "INSTRUCTION_BYTES = 256",
           ["tests/test_everyday_files.py", "tests/test_reader_limits.py", "-k", "full_size or instructions"],
           why="a student's DataLoader-written set refused again"),
    defect("instruction-limit-loosened", "restricted_pickle.py", "INSTRUCTION_BYTES = 32", "INSTRUCTION_BYTES = 4",
           ["tests/test_reader_limits.py", "tests/test_hostile_inputs.py", "-k", "instructions or opcode or data_pickle"],
           why="eight times the objects a file may build"),
    defect("float64-images-refused", "dataset.py", "if image.dtype not in (torch.float32, torch.float64):",
           "if image.dtype != torch.float32:", ["tests/test_everyday_files.py", "-k", "float64"]),
    defect("prefix-stripped-from-some-keys", "models.py", "        if other is not None:\n            carrying",
           "        if False:\n            carrying", ["tests/test_everyday_files.py", "-k", "prefix"]),
    defect("whole-model-without-advice", "untrusted.py", "    if isinstance(error, UnknownGlobal) and looks_like_a_module(pickled):",
           "    if False:", ["tests/test_everyday_files.py", "-k", "whole_pickled"]),
    defect("layout-note-dropped", "models.py", "    if note:\n        note_once(note)", "    pass",
           ["tests/test_everyday_files.py", "-k", "layout"], why="the output no longer says which layout it read"),
    # --- the refusals' exact lines (test_hostile_inputs.py's tables and the files beside it)
    defect("text-read-as-a-pickle-global", "restricted_pickle.py",
           "if not (python_name(module) and python_name(name)):", "if False:",
           ["tests/test_hostile_inputs.py", "-k", "data_pickle and text"],
           why="a text file given as data 'refers to ar,truck,cat.1,2,3' again"),
    defect("empty-data-file-read-as-eof", "untrusted.py",
           '    if not data:\n        return UserError(f"{path}: empty file',
           '    if False:\n        return UserError(f"{path}: empty file',
           ["tests/test_hostile_inputs.py", "-k", "data_pickle and zero"],
           why="a 0-byte file 'does not start as a pickle does' instead of being called empty"),
    defect("data-refusal-drops-the-path", "untrusted.py", '        raise UserError(f"{path}: refused: {e}") from None',
           '        raise UserError(f"refused: {e}") from None',
           ["tests/test_hostile_inputs.py", "-k", "data_pickle and system"],
           why="a refused data pickle no longer names the file"),
    defect("instruction-bound-names-the-count", "restricted_pickle.py",
           'f"({self.instruction_limit:,}: one per {INSTRUCTION_BYTES} bytes',
           'f"({self.instructions_used():,}: one per {INSTRUCTION_BYTES} bytes',
           ["tests/test_reader_limits.py", "-k", "instructions"],
           why="the line gives the instructions run (one past the limit), not the limit"),
    defect("truncated-checkpoint-as-broken-zip", "untrusted.py", 'if str(e) == "File is not a zip file":', "if False:",
           ["tests/test_models.py", "-k", "truncated"], why="'broken zip archive: File is not a zip file' again"),
    defect("fingerprint-type-says-data-changed", "resume_state.py",
           "if not (isinstance(fingerprint, str) and len(fingerprint) == 64",
           "if False and (isinstance(fingerprint, str) and len(fingerprint) == 64",
           ["tests/test_hostile_inputs.py", "-k", "tampered_resume_state and fingerprint"],
           why="a malformed resume state is said to come from changed training data"),
    defect("other-weight-decay-as-a-type", "resume_state.py", "and type(group[k]) is not type(v) and group[k] != v):",
           "and False):", ["tests/test_hostile_inputs.py", "-k", "tampered_resume_state and decay"],
           why="a weight decay of 0.5 'expected a whole number' again"),
    defect("resume-read-refusal-without-flag", "resume_state.py",
           'raise UserError(f"--resume: {e}{RESUME_FIX}") from None', "raise UserError(str(e)) from None",
           ["tests/test_hostile_inputs.py", "-k", "tampered_resume_state and (meta or sparse or shadowed)"],
           why="an unreadable resume state's line loses --resume and what to do"),
    defect("tester-makes-its-folder-first", "tester.py", 'out = check_output_dir(args.out, "--out", create=False)',
           'out = check_output_dir(args.out, "--out")', ["tests/test_hostile_inputs.py", "-k", "refused_for_its_data"],
           why="a refused tester.py run leaves figures/ behind"),
    defect("quoted-flag-value-miscounted", "cli.py",
           """        message = re.sub(r"'([^'\\s]{41,})'", lambda m: f"'{clip(m[1])}'", message)"""
           "  # a quoted value, cut inside\n", "", ["tests/test_hostile_inputs.py", "-k", "huge_flag"],
           why="an invalid choice of 5,000 letters is '5,002 characters' and loses its closing quote"),
    defect("one-items", "cli.py", "item{'' if len(value) == 1 else 's'}", "items",
           ["tests/test_hostile_inputs.py", "-k", "data_pickle and lists"], why="'a list of 1 items' again"),
    # --- gaps a red team found: defects the suite above missed, each with the test written for it
    defect("ece-bins-closed-left", "metrics.py",
           "which = np.searchsorted(np.linspace(0, 1, bins + 1)[1:-1], confidence)",
           'which = np.searchsorted(np.linspace(0, 1, bins + 1)[1:-1], confidence, side="right")',
           ["tests/test_metrics.py", "-k", "calibration"], why="a confidence on a bin edge goes to the bin above"),
    defect("ece-edges-off-by-one", "metrics.py",
           "which = np.searchsorted(np.linspace(0, 1, bins + 1)[1:-1], confidence)",
           "which = np.searchsorted(np.linspace(0, 1, bins)[1:-1], confidence)",
           ["tests/test_metrics.py", "-k", "calibration"], why="bins - 1 bins of the wrong width"),
    defect("large-epsilon-raised", "gradient_masking.py", "LARGE_EPSILON = 0.25", "LARGE_EPSILON = 0.3",
           ["tests/test_robustness.py", "-k", "large_epsilon"], why="a sweep ending at 0.25 is never checked"),
    defect("large-epsilon-survivors-loosened", "gradient_masking.py", "SURVIVORS = 0.10",
           "SURVIVORS = 0.25", ["tests/test_robustness.py", "-k", "large_epsilon"]),
    defect("pgd-default-step-half", "attacks.py",
           "step = EPS_SCALE * (epsilon / 4 if step_size is None else step_size)",
           "step = EPS_SCALE * (epsilon / 2 if step_size is None else step_size)",
           ["tests/test_robustness.py", "-k", "quarter_epsilon"], why="--step-size's documented default is eps/4"),
    defect("pgd-default-steps", "attacks.py", "def pgd_perturb(model, images, labels, epsilon, steps=10,",
           "def pgd_perturb(model, images, labels, epsilon, steps=5,",
           ["tests/test_robustness.py", "-k", "quarter_epsilon"]),
    defect("worst-case-needs-every-attack", "adversarialExample.py",
           "torch.stack([broken_at[(n, eps)] for n in attacks]).any(0)",
           "torch.stack([broken_at[(n, eps)] for n in attacks]).all(0)",
           ["tests/test_robustness.py", "-k", "worst_case"], why="the worst case counts what every attack broke"),
    defect("restarts-without-random-start", "adversarialExample.py",
           "    random_start = args.random_start or args.restarts > 1\n", "    random_start = args.random_start\n",
           ["tests/test_robustness.py", "-k", "restarts_imply"],
           why="--restarts N repeats one deterministic attack (the report still says random_start)"),
    defect("stale-examples-kept", "adversarial_figures.py",
           '    for stale in [*out_dir.glob("example*_*.png"), out_dir / "overview.png"]:',
           "    for stale in []:", ["tests/test_adversarial.py", "-k", "no_example_figure"],
           why="an earlier run's panels pass for this run's"),
    defect("skip-bad-ignored-for-folders", "tester.py",
           "images, labels, files, skipped = load_labeled_data(args.data, args.cifar_dir, args.skip_bad)",
           "images, labels, files, skipped = load_labeled_data(args.data, args.cifar_dir)",
           ["tests/test_tester.py", "-k", "skip_bad_with"]),
    defect("skipped-files-not-reported", "tester.py", 'record["skipped"] = skipped', 'record["skipped"] = []',
           ["tests/test_tester.py", "-k", "skip_bad_with"]),
    defect("one-wrapper-stripped", "models.py", "MAX_WRAPPERS = 4", "MAX_WRAPPERS = 1",
           ["tests/test_models.py", "-k", "stacked"], why="DistributedDataParallel around torch.compile refused"),
    defect("value-tolerance-loosened", "dataset.py", "VALUE_TOLERANCE = 1e-3", "VALUE_TOLERANCE = 1e-2",
           ["tests/test_dataset.py", "-k", "tolerance or tolerated"]),
    defect("value-tolerance-tightened", "dataset.py", "VALUE_TOLERANCE = 1e-3", "VALUE_TOLERANCE = 1e-4",
           ["tests/test_dataset.py", "-k", "tolerance or tolerated"]),
    defect("un-normalize-transposed", "dataset.py", "np.transpose(np.asarray(img) / 2 + 0.5, (1, 2, 0))",
           "np.transpose(np.asarray(img) / 2 + 0.5, (2, 1, 0))", ["tests/test_dataset.py", "-k", "un_normalize"],
           why="width and height swapped (invisible on a square image of one colour per channel)"),
    defect("cifar-cat-is-dog", "dataset.py", "CIFAR_IDS = (1, 9, 3)", "CIFAR_IDS = (1, 9, 5)",
           ["tests/test_dataset.py", "-k", "label_ids"], why="the batches' cats are CIFAR-10's dogs"),
    defect("divergence-points-to-the-checkpoint", "trainer.py",
           'kept = f"the last good state (epoch {finished}) is in {state_path}"',
           'kept = f"the last good state (epoch {finished}) is in {args.out}"',
           ["tests/test_trainer.py", "-k", "divergence"]),
    defect("resume-ignores-mix", "resume_state.py", '"drw_start", "mix", "mix_alpha"', '"drw_start", "mix_alpha"',
           ["tests/test_trainer.py", "-k", "every_run_defining"], why="--resume with another --mix goes on silently"),
    defect("resume-ignores-ema", "resume_state.py", '"mix_alpha", "ema", "val_fraction"',
           '"mix_alpha", "val_fraction"', ["tests/test_trainer.py", "-k", "every_run_defining"]),
    defect("resume-ignores-tau", "resume_state.py", '"loss", "tau", "drw_start"', '"loss", "drw_start"',
           ["tests/test_trainer.py", "-k", "every_run_defining"]),
    defect("kept-checkpoint-tolerance-loosened", "resume_state.py", 'if score < best["score"] - 0.01:',
           'if score < best["score"] - 0.05:', ["tests/test_trainer.py", "-k", "hundredth"]),
    defect("amp-float16", "devices.py", "return torch.autocast(device.type, dtype=torch.bfloat16)",
           "return torch.autocast(device.type, dtype=torch.float16)", ["tests/test_devices.py", "-k", "autocasts_to"],
           why="float16 without loss scaling underflows gradients"),
    defect("deterministic-benchmark-on", "devices.py", "torch.backends.cudnn.benchmark = False",
           "torch.backends.cudnn.benchmark = True", ["tests/test_devices.py", "-k", "reproducibility_notes"]),
    defect("deterministic-cudnn-off", "devices.py", "torch.backends.cudnn.deterministic = True",
           "torch.backends.cudnn.deterministic = False", ["tests/test_devices.py", "-k", "reproducibility_notes"]),
    defect("deterministic-warn-only", "devices.py", "torch.use_deterministic_algorithms(True)",
           "torch.use_deterministic_algorithms(True, warn_only=True)",
           ["tests/test_devices.py", "-k", "reproducibility_notes"]),
    defect("validation-split-may-hold-none", "treatments.py", "count = max(1, round(fraction * len(members)))",
           "count = round(fraction * len(members))", ["tests/test_treatments.py", "-k", "validation_split"],
           why="a rare class gets no validation image"),
    defect("balanced-softmax-takes-tau", "treatments.py",
           'tau = 1.0 if args.loss == "balanced-softmax" else args.tau', "tau = args.tau",
           ["tests/test_treatments.py", "-k", "tau_1"]),
    defect("balanced-softmax-tau-ignored", "treatments.py",
           'if args.loss == "balanced-softmax" and args.tau != 1.0:', "if False:",
           ["tests/test_treatments.py", "-k", "tau_1"], why="--tau beside balanced-softmax silently ignored"),
    defect("label-issues-replays-kept-flags", "label_repair.py",
           'for e in entries["issues"]\n                       if e.get("acted", True) is not False]',
           'for e in entries["issues"]]', ["tests/test_trainer.py", "-k", "acted_on or finds_planted"],
           why="a label_issues.json as --fix-labels relabels the flags its run kept"),
    defect("big-endian-read-as-little", "pickled_data.py",
           'newbyteorder(">" if self.byteorder == ">" else "<")', 'newbyteorder("<")',
           ["tests/test_dataset.py", "-k", "big_endian"]),
    defect("storage-bound-off-by-one", "pickled_tensors.py", "        if last >= n:", "        if last > n:",
           ["tests/test_dataset.py", "-k", "one_past"], why="a tensor may read one element past its storage"),
    defect("second-writer-waits", "cli.py", "with file_lock(lock_path, wait=False, busy=busy):",
           "with file_lock(lock_path, wait=True, busy=busy):", ["tests/test_devices.py", "-k", "second_writer"],
           why="a second run on the same --out waits for ever: the test's deadline fails it"),
    defect("ctrl-c-exit-status", "cli.py", "    exit_code = 130", "    exit_code = 1",
           ["tests/test_trainer.py", "-k", "ctrl_c_saves"]),
    defect("ctrl-c-between-write-and-record", "trainer.py",
           "            with ctrl_c_after():\n                atomic_write(state_path,",
           "            if True:\n                atomic_write(state_path,",
           ["tests/test_trainer.py", "-k", "right_after_the_state"],
           why="a Ctrl-C just after the state is written says nothing was saved"),
]


def scratch_copy(dest):
    """The files git tracks and the new ones it does not ignore, as they are in the working tree."""
    listing = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                             capture_output=True, check=True).stdout.decode().split("\0")
    for name in filter(None, listing):
        source = ROOT / name
        if source.is_file():  # a file deleted in the working tree but still tracked is left out
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, dest / name)


def check_defects(defects, copy):
    """Every defect's text is there exactly `count` times: otherwise the bench would plant nothing."""
    problems = []
    for d in defects:
        text = (copy / d["path"]).read_text()
        found = text.count(d["old"])
        if found != d["count"]:
            problems.append(f"{d['name']}: {d['path']} holds its text {found} times, expected {d['count']}: "
                            f"{d['old'][:70]!r}")
    return problems


def cifar_dir():
    for candidate in (os.environ.get("CIFAR10_DIR"), ROOT.parent / "shared" / "cifar10-images"):
        if candidate and Path(candidate).is_dir():
            return str(Path(candidate).resolve())
    return None


def run_tests(copy, tests, timeout):
    """Run pytest on the copy; (outcome, seconds, last lines). outcome: passed, failed, timeout, error."""
    env = {**os.environ, "MPLBACKEND": "Agg", "REQUIRE_ALL_TESTS": "1", "PYTHONDONTWRITEBYTECODE": "1"}
    if cifar_dir():
        env["CIFAR10_DIR"] = cifar_dir()
    start = time.time()
    try:
        result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *tests],
                                cwd=copy, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return "timeout", time.time() - start, ""
    seconds = time.time() - start
    tail = "\n".join((result.stdout + result.stderr).strip().splitlines()[-3:])
    # pytest: 0 all passed, 1 some failed, 2 interrupted (a collection error), 5 no tests collected.
    outcome = {0: "passed", 1: "failed", 2: "failed"}.get(result.returncode, "error")
    return outcome, seconds, tail


def union(selections):
    """One pytest selection that runs every test any of the selections names (files joined, -k or-ed)."""
    files, keywords, whole = [], [], set()
    for tests in selections:
        named = [t for t in tests if t.startswith("tests/")]
        k = tests[tests.index("-k") + 1] if "-k" in tests else None
        for f in named:
            if f not in files:
                files.append(f)
            if k is None:
                whole.add(f)
        if k is not None:
            keywords.append((set(named), k))
    # Files run whole by one selection run whole; the rest by the or of their keywords.
    runs = [[f] for f in files if f in whole]
    rest = [f for f in files if f not in whole]
    if rest:
        expression = " or ".join(f"({k})" for named, k in keywords if named & set(rest))
        runs.append([*rest, "-k", expression])
    return runs


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--list", action="store_true", help="list the defects and exit")
    parser.add_argument("--only", nargs="+", metavar="DEFECT", help="plant only these defects")
    parser.add_argument("--skip-clean", action="store_true", help="skip the run of the selected tests without defects")
    parser.add_argument("--timeout", type=int, default=900, help="seconds per test run (default: 900)")
    parser.add_argument("--keep", action="store_true", help="keep the scratch copy (its path is printed)")
    args = parser.parse_args()

    names = [d["name"] for d in DEFECTS]
    if len(set(names)) != len(names):
        sys.exit("bench/planted_defects.py: two defects share a name")
    if args.list:
        for d in DEFECTS:
            print(f"{d['name']:<40} {d['path']:<22} {' '.join(d['tests'])}" + (f"  ({d['why']})" if d["why"] else ""))
        return 0
    unknown = sorted(set(args.only or []) - set(names))
    if unknown:
        sys.exit(f"bench/planted_defects.py: no such defect: {', '.join(unknown)} (see --list)")
    chosen = [d for d in DEFECTS if not args.only or d["name"] in args.only]

    copy = Path(tempfile.mkdtemp(prefix="planted_defects_"))
    try:
        scratch_copy(copy)
        problems = check_defects(DEFECTS, copy)  # all of them, always: a rotten defect is news
        if problems:
            print("defects whose text is not found (update them to the code as it is now):", *problems, sep="\n  ")
            return 2
        if not cifar_dir():
            print("no local CIFAR-10 copy (set CIFAR10_DIR): the integration tests cannot run")
            return 2
        if not args.skip_clean:
            for tests in union([d["tests"] for d in chosen]):
                outcome, seconds, tail = run_tests(copy, tests, args.timeout)
                print(f"clean run ({' '.join(tests)[:100]}): {outcome} in {seconds:.0f}s", flush=True)
                if outcome != "passed":
                    print(tail)
                    return 2
        rows = []
        for d in chosen:
            target = copy / d["path"]
            original = target.read_text()
            target.write_text(original.replace(d["old"], d["new"]))
            try:
                outcome, seconds, tail = run_tests(copy, d["tests"], args.timeout)
            finally:
                target.write_text(original)
            caught = {"failed": "yes", "timeout": "yes (timeout)", "passed": "NO"}.get(outcome, f"? ({outcome})")
            rows.append((d["name"], " ".join(d["tests"]), caught, seconds))
            print(f"{d['name']}: caught {caught} in {seconds:.0f}s", flush=True)
            if outcome == "error":
                print(tail)
    finally:
        if args.keep:
            print(f"scratch copy kept: {copy}")
        else:
            shutil.rmtree(copy, ignore_errors=True)

    width = max(len(r[0]) for r in rows)
    test_width = min(70, max(len(r[1]) for r in rows))
    print(f"\n{'defect':<{width}} | {'tests run':<{test_width}} | caught | time")
    print(f"{'-' * width}-|-{'-' * test_width}-|--------|------")
    for name, tests, caught, seconds in rows:
        print(f"{name:<{width}} | {tests[:test_width]:<{test_width}} | {caught:<6} | {seconds:4.0f}s")
    missed = [r[0] for r in rows if r[2] == "NO"]
    odd = [r[0] for r in rows if r[2].startswith("?")]
    print(f"\n{len(rows) - len(missed) - len(odd)} of {len(rows)} defects caught"
          + (f"; missed: {', '.join(missed)}" if missed else "")
          + (f"; bench errors: {', '.join(odd)}" if odd else ""))
    return 1 if missed or odd else 0


if __name__ == "__main__":
    sys.exit(main())
