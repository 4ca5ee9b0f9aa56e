"""trainer.py's resume state (<out>.resume.pt): every field checked against this run before any is used.

A resume state is a torch.save() file like a checkpoint, read the same safe way
(untrusted.read_torch_file), but it decides what a resumed run trains on: the repaired labels,
the images kept, the weights and the optimizer's and schedule's place. A tampered or damaged
state must not be used silently (an integer 'keep' would index images instead of masking
them) nor fail later with advice that does not fit (NaN in Adam's moments is not a learning
rate to lower). check_resume_state checks what decides what to train on, as soon as the state
is read; check_training_state the weights, optimizer and schedule, before they are loaded.
A state that does not fit is one line naming the field. load_resume and restore are what
trainer.py calls: read and check, then load into the fresh model, optimizer and schedule.
"""
import copy
import hashlib
import math
import warnings
from pathlib import Path

import torch

from cli import UserError, describe, whole
from label_repair import hand_made_labels
from metrics import compute_metrics
from models import load_model, predict
from untrusted import check_state_dict, read_torch_file, tensor_problem


def _mismatch(value, example, unit=False):
    """Where value first differs in kind from example (same keys, lengths, types; floats finite, and in
    [0, 1] with unit), as a few words, or None. Walks example's structure, never value's own depth."""
    if isinstance(example, dict):
        if not isinstance(value, dict):
            return f"is {describe(value)}, expected a dict"
        if set(value) != set(example):
            extra = sorted(map(describe, set(value) - set(example)))[:3]
            missing = sorted(map(str, set(example) - set(value)))[:3]
            return f"has other keys (missing {', '.join(missing) or 'none'}; unexpected {', '.join(extra) or 'none'})"
        for key in example:
            problem = _mismatch(value[key], example[key], unit)
            if problem:
                return f"{key} {problem}"
        return None
    if isinstance(example, (list, tuple)):
        if type(value) is not type(example) or len(value) != len(example):
            return f"is {describe(value)}, expected a {type(example).__name__} of {len(example)} items"
        for i, (v, e) in enumerate(zip(value, example)):
            problem = _mismatch(v, e, unit)
            if problem:
                return f"[{i}] {problem}"
        return None
    if isinstance(example, torch.Tensor):
        if not isinstance(value, torch.Tensor) or value.dtype != example.dtype or value.shape != example.shape:
            return f"is {describe(value)}, expected {describe(example)}"
        return tensor_problem(value)
    if isinstance(example, float):
        if not isinstance(value, float) or not math.isfinite(value) or unit and not 0 <= value <= 1:
            return f"is {describe(value)}, expected a finite number" + (" from 0 to 1" if unit else "")
        return None
    if type(value) is not type(example):  # bool, int, str, None
        kind = {bool: "True or False", int: "a whole number", str: "text"}.get(type(example), "None")
        return f"is {describe(value)}, expected {kind}"
    return None


# The optimizer state per parameter, by optimizer: a scalar step count, or tensors shaped like the parameter.
OPTIMIZER_STATE = {torch.optim.Adam: {"step": "scalar", "exp_avg": "param", "exp_avg_sq": "param"},
                   torch.optim.AdamW: {"step": "scalar", "exp_avg": "param", "exp_avg_sq": "param"},
                   torch.optim.SGD: {"momentum_buffer": "param"}}
RESUME_FIX = "; delete it to start over, or run without --resume"
# The scheduler's progress; everything else in its state is configuration, equal to a fresh one's.
SCHEDULER_PROGRESS = {"last_epoch", "_step_count", "_last_lr", "_is_initial", "_get_lr_called_within_step"}


def _labels_problems(labels, keep, given, config):
    """What is wrong with the stored labels and kept mask for this run's --fix-labels, by field."""
    if config["fix_labels"] != "auto":  # none or a file: the same labels again, at no cost
        fixed, kept, _ = hand_made_labels(given, config["fix_labels"])
        source = f"--fix-labels {config['fix_labels']} gives" + (" (has the file changed?)"
                                                                  if config["fix_labels"] != "none" else "")
        return {"labels": None if torch.equal(labels, fixed) else f"differ from what {source}",
                "keep": None if torch.equal(keep, kept) else f"differs from what {source}"}
    # Automatic repair takes as long as training to run again; what it may do is checked instead.
    if config["repair_action"] == "relabel" and not keep.all():
        return {"keep": "drops images, but --repair-action relabel keeps every one"}
    if config["repair_action"] != "relabel" and not torch.equal(labels, given):
        return {"labels": "differ from the data's, but --repair-action drop changes none"}
    return {}


def check_resume_state(state, where, expect):
    """Refuse a resume state that does not fit this run, with one line naming the field.

    expect: epochs (of the run), labels (the training data's given labels), config (this run's
    settings, by key), fingerprint (the data's SHA-256), entry (what one epoch's history record
    looks like, its loss aside), best (whether --select best-val keeps a best record), ema
    (whether an average of the weights is kept). This checks what decides what to train on;
    check_training_state checks the weights and the optimizer's and scheduler's state.
    """
    needed = ["model", "optimizer", "scheduler", "epoch", "history", "labels", "keep", "config", "data_sha256",
              "average", "best"]
    if not isinstance(state, dict):
        raise UserError(f"--resume: {where}: not a resume state of this trainer.py (it holds {describe(state)}, not a "
                        f"dict){RESUME_FIX}")
    missing = [k for k in needed if k not in state]
    if missing:
        raise UserError(f"--resume: {where}: not a resume state of this trainer.py (it has no {', '.join(missing)})"
                        f"{RESUME_FIX}")
    if not isinstance(state["config"], dict):
        raise UserError(f"--resume: {where}: config is {describe(state['config'])}, not a dict of settings{RESUME_FIX}")
    config = {**LATER_RUN_KEYS, **state["config"]}
    # A setting is a plain value (a number, text, a flag, None); anything else is no run's setting.
    odd = next((k for k in expect["config"] if type(config.get(k)) not in (bool, int, float, str, type(None))), None)
    if odd is not None:
        raise UserError(f"--resume: {where}: config {odd} is {describe(config[odd])}, not a setting{RESUME_FIX}")
    changed = [k for k, v in expect["config"].items() if type(config.get(k)) is not type(v) or config.get(k) != v]
    if changed:
        shown = "; ".join(f"{k} {describe(config.get(k))} there, {describe(expect['config'][k])} here"
                          for k in changed[:3]) + (f"; {len(changed) - 3} more" if len(changed) > 3 else "")
        raise UserError(f"--resume: {where}: belongs to a run with other settings ({shown}); use the same flags or "
                        "start without --resume")
    fingerprint = state["data_sha256"]
    if not (isinstance(fingerprint, str) and len(fingerprint) == 64
            and all(c in "0123456789abcdef" for c in fingerprint)):
        raise UserError(f"--resume: {where}: data_sha256 is {describe(fingerprint)}, not the SHA-256 of training data "
                        f"(the resume state is malformed){RESUME_FIX}")
    if fingerprint != expect["fingerprint"]:
        raise UserError(f"--resume: {where}: the training data {config['data']} has changed since it was written "
                        "(its stored labels belong to other images); restore that data or start without --resume")
    epoch, n, history = state["epoch"], len(expect["labels"]), state["history"]
    if not whole(epoch) or not 1 <= epoch <= expect["epochs"]:
        raise UserError(f"--resume: {where}: epoch {describe(epoch)} is not one of 1 to {expect['epochs']}{RESUME_FIX}")
    problems = {"labels": _mismatch(state["labels"], torch.zeros(n, dtype=torch.long)),
                "keep": _mismatch(state["keep"], torch.zeros(n, dtype=torch.bool)), "history": None, "best": None,
                "average": None}
    if problems["labels"] is None and not ((state["labels"] >= 0) & (state["labels"] <= 2)).all():
        problems["labels"] = "holds values other than 0 (car), 1 (truck) and 2 (cat)"
    if problems["keep"] is None and not state["keep"].any():
        problems["keep"] = "keeps no image"
    if problems["labels"] is None and problems["keep"] is None:
        problems.update(_labels_problems(state["labels"], state["keep"], expect["labels"], config))
    if not isinstance(history, list) or len(history) != epoch:
        problems["history"] = f"is {describe(history)}, expected a list of {epoch} epoch{'' if epoch == 1 else 's'}"
    else:
        for i, entry in enumerate(history):
            if not isinstance(entry, dict) or not isinstance(entry.get("loss"), float):
                problem = f"is {describe(entry)}, not an epoch's record with its loss"
            else:
                problem = _mismatch({k: v for k, v in entry.items() if k != "loss"}, expect["entry"], unit=True)
                if problem is None and (entry["epoch"] != i + 1 or not 0 <= entry["loss"] < math.inf):
                    problem = f"is not epoch {i + 1}'s record"
            if problem:
                problems["history"] = f"[{i}] {problem}"
                break
    best = state["best"]
    if expect["best"] and not (
            problems["history"] is None and isinstance(best, dict) and set(best) == {"epoch", "score"}
            and whole(best["epoch"]) and 1 <= best["epoch"] <= epoch and type(best["score"]) is float
            and best["score"] == history[best["epoch"] - 1]["val"]["balanced_accuracy"]):
        problems["best"] = f"is {describe(best)}, not the record of one of its epochs"
    if not expect["best"] and best is not None:
        problems["best"] = f"is {describe(best)}, but this run keeps the last epoch"
    if (state["average"] is None) == expect["ema"]:
        problems["average"] = "is missing" if expect["ema"] else "is there, but this run keeps no average"
    for key, problem in problems.items():
        if problem:
            raise UserError(f"--resume: {where}: {key} {problem}{RESUME_FIX}")


SCHEDULED = ("lr", "momentum", "betas")  # what a schedule may move in an optimizer's param_groups
# How an optimizer computes its step, not what it computes: torch chooses them per device (fused
# kernels on the CPU and CUDA, not on MPS) and adds new ones over releases. A state saved on one
# device resumes on another; this run's own choices are kept (implementation_as_this_run).
IMPLEMENTATION_FLAGS = {"foreach", "fused", "capturable", "differentiable"}


def scheduled_settings(optimizer, scheduler, steps):
    """(each param group's lr, momentum and betas, the scheduler's state) after `steps` steps of this
    run's schedule: the fresh scheduler stepped that far, then optimizer and scheduler put back."""
    saved = copy.deepcopy(optimizer.state_dict()), copy.deepcopy(scheduler.state_dict())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "scheduler.step() before optimizer.step()": nothing trains here
        for _ in range(steps):
            scheduler.step()
    settings = [{k: group[k] for k in SCHEDULED if k in group} for group in optimizer.param_groups]
    stepped = copy.deepcopy(scheduler.state_dict())
    optimizer.load_state_dict(saved[0])
    scheduler.load_state_dict(saved[1])
    return settings, stepped


def _setting_text(value):
    if isinstance(value, (tuple, list)):
        inside = ", ".join(map(describe, value[:4])) + (", ..." if len(value) > 4 else "")
        return f"({inside})" if isinstance(value, tuple) else f"[{inside}]"
    return describe(value)


def _same_setting(saved, expected):
    if isinstance(expected, (tuple, list)):
        return len(saved) == len(expected) and all(map(_same_setting, saved, expected))
    if isinstance(expected, bool):
        return saved is expected
    return math.isclose(saved, expected, rel_tol=1e-9, abs_tol=1e-15)


def _number(value):
    return type(value) in (int, float)


def _other_setting(key, saved, this_run):
    return (f"param_groups hold other settings than this run's ({key} {_setting_text(saved)}, not "
            f"{_setting_text(this_run)})")


def _optimizer_problem(saved, optimizer, steps, scheduled):
    fresh = optimizer.state_dict()
    if not isinstance(saved, dict) or set(saved) != {"state", "param_groups"} or not isinstance(saved["state"], dict):
        return f"is {describe(saved)}, not an optimizer's state"
    # Only what changes the arithmetic of training is compared: every setting of this torch's optimizer
    # but its implementation flags. A flag this torch does not know is an implementation flag too.
    arithmetic = [{k: v for k, v in group.items() if k not in IMPLEMENTATION_FLAGS} for group in fresh["param_groups"]]
    groups = saved["param_groups"]
    if isinstance(groups, list) and all(isinstance(group, dict) for group in groups):
        groups = [{k: group[k] for k in fresh_group if k in group} for group, fresh_group in zip(groups, arithmetic)] \
            + groups[len(arithmetic):]
        # A number of the other kind (a weight decay of 0.5 where this run's is 0) is another setting, not a
        # malformed one: said so here, before the check of each value's type below.
        for group, fresh_group in zip(groups, arithmetic):
            for k, v in fresh_group.items():
                if (k not in SCHEDULED and k in group and _number(group[k]) and _number(v)
                        and type(group[k]) is not type(v) and group[k] != v):
                    return _other_setting(k, group[k], v)
    problem = _mismatch(groups, arithmetic)
    if problem:
        return f"param_groups {problem}"
    for group, fresh_group, expected in zip(groups, arithmetic, scheduled):
        if any(group[k] != v for k, v in fresh_group.items() if k not in SCHEDULED):
            k = next(k for k, v in fresh_group.items() if k not in SCHEDULED and group[k] != v)
            return _other_setting(k, group[k], fresh_group[k])
        # A learning rate of 1000 or a beta2 of 0 would train on silently, or diverge with the wrong advice.
        for key, value in expected.items():
            if not _same_setting(group[key], value):
                return (f"param_groups {key} is {_setting_text(group[key])}, not the {_setting_text(value)} "
                        f"this run's schedule gives after {steps} steps")
    params = [p for group in optimizer.param_groups for p in group["params"]]  # state_dict numbers them in order
    expected = OPTIMIZER_STATE.get(type(optimizer), {})
    for index, entry in saved["state"].items():
        if not (whole(index) and 0 <= index < len(params)):
            return (f"state {describe(index)} is not the state of one of this model's parameters (0 to "
                    f"{len(params) - 1})")
        if not isinstance(entry, dict) or set(entry) != set(expected):
            found = ", ".join(sorted(map(describe, entry))[:4]) if isinstance(entry, dict) else describe(entry)
            return (f"state {index} holds {found or 'nothing'}, not the state {type(optimizer).__name__} keeps per "
                    f"parameter ({', '.join(expected)})")
        for name, value in entry.items():
            if value is None and name == "momentum_buffer":
                if steps and any(group["momentum"] for group in optimizer.param_groups):
                    unit = "step" if steps == 1 else "steps"
                    return f"state {index} has no momentum buffer after {steps} {unit} with momentum"
                continue
            like = torch.zeros(()) if expected[name] == "scalar" else torch.zeros_like(params[index], device="cpu")
            problem = _mismatch(value.cpu() if isinstance(value, torch.Tensor) and not value.is_meta else value, like)
            if problem is None and name == "step" and value != steps:
                unit = "step" if value == 1 else "steps"
                problem = f"counts {float(value):g} {unit}, not the {steps} of the saved epochs"
            if problem is None and name == "exp_avg_sq" and (value < 0).any():
                problem = "holds negative values (a mean of squares)"
            if problem:
                return f"state {index} {name} {problem}"
    # Every parameter gets a gradient in every step, so after an epoch each has its state; a
    # parameter without one would silently restart its moments from zero.
    if steps and len(saved["state"]) != len(params):
        return f"state covers {len(saved['state'])} of this model's {len(params)} parameters, not all"
    return None


def check_training_state(state, where, model, optimizer, scheduler, steps_per_epoch):
    """Refuse a resume state whose weights, optimizer or scheduler state do not fit this run's, before loading."""
    for key in ("model", "average"):
        if key == "model" or state[key] is not None:
            try:
                check_state_dict(model, state[key], f"--resume: {where}: {key}", what="resume state")
            except UserError as e:
                raise UserError(f"{e}{RESUME_FIX}") from None
    steps = state["epoch"] * steps_per_epoch
    settings, stepped = scheduled_settings(optimizer, scheduler, steps)
    problem = _optimizer_problem(state["optimizer"], optimizer, steps, settings)
    if problem:
        raise UserError(f"--resume: {where}: optimizer {problem}{RESUME_FIX}")
    fresh, saved = scheduler.state_dict(), state["scheduler"]
    if not isinstance(saved, dict) or set(saved) != set(fresh):
        problem = f"is {describe(saved)}, not the state of this run's schedule"
    elif any(type(saved[k]) is not type(v) or saved[k] != v for k, v in fresh.items() if k not in SCHEDULER_PROGRESS):
        k = next(k for k, v in fresh.items() if k not in SCHEDULER_PROGRESS and (type(saved[k]) is not type(v)
                                                                               or saved[k] != v))
        problem = (f"has other settings than this run's schedule ({k} {_setting_text(saved[k])}, not "
                   f"{_setting_text(fresh[k])})")
    else:
        problem = _mismatch({k: saved[k] for k in SCHEDULER_PROGRESS}, {k: fresh[k] for k in SCHEDULER_PROGRESS})
        if problem is None and (saved["last_epoch"] != state["epoch"] * steps_per_epoch
                                or saved["_step_count"] != saved["last_epoch"] + 1):
            problem = f"stands at step {describe(saved['last_epoch'])}, not at the end of epoch {state['epoch']}"
        # Its flags and last rates too: with _is_initial set, a cosine schedule would hold its rate.
        wrong = next((k for k in sorted(SCHEDULER_PROGRESS) if problem is None
                      and not _same_setting(saved[k], stepped[k])), None)
        if wrong:
            problem = f"{wrong} is {_setting_text(saved[wrong])}, not what this run's schedule has after {steps} steps"
    if problem:
        raise UserError(f"--resume: {where}: scheduler {problem}{RESUME_FIX}")


# ---------------------------------------------------------------------------
# Where the state lives, what identifies its run, and loading it into a fresh run


def resume_path(out):
    return Path(out).with_suffix(".resume.pt")


# The settings a resumed run must share with the run it continues.
RUN_KEYS = ("model", "epochs", "lr", "batch_size", "optimizer", "weight_decay", "schedule", "label_smoothing",
            "sampler", "augment", "fix_labels", "repair_folds", "repair_epochs", "repair_action", "repair_pairs",
            "seed", "data", "adversarial", "adv_epsilon", "adv_steps", "adv_step_size", "robust_eval",
            "arch", "loss", "tau", "drw_start", "mix", "mix_alpha", "ema", "val_fraction", "select", "repair_model",
            "amp", "deterministic")
# Settings added to RUN_KEYS after resume states were first written, with the value those states ran with.
LATER_RUN_KEYS = {"amp": False, "deterministic": False}


def data_fingerprint(images, labels):
    """SHA-256 of the training tensors: a resume must continue on the very data it started on."""
    digest = hashlib.sha256(images.contiguous().numpy().tobytes())
    digest.update(labels.numpy().astype("int64").tobytes())
    return digest.hexdigest()


def load_resume(path, args, fingerprint, given_labels):
    """The resume state at path, every field checked against this run (check_resume_state)."""
    if not Path(path).exists():
        raise UserError(f"--resume: {path}: no resume state there (start without --resume)")
    try:
        state = read_torch_file(path, "resume state")
    except UserError as e:  # a file that cannot be read safely: the same line, naming the flag
        raise UserError(f"--resume: {e}{RESUME_FIX}") from None
    metrics = compute_metrics([0, 1, 2], [0, 1, 2])  # what an epoch's scores look like
    entry = {"epoch": 1, "dev": metrics, "val": metrics if args.val_fraction else None}
    if args.adversarial != "none" and args.robust_eval:
        entry["robust"] = {"clean": 0.0, "fgsm": 0.0, "pgd": 0.0}
    check_resume_state(state, path, dict(
        epochs=args.epochs, labels=given_labels, config={k: getattr(args, k) for k in RUN_KEYS},
        fingerprint=fingerprint, entry=entry, best=args.select == "best-val", ema=bool(args.ema)))
    return state


def implementation_as_this_run(saved, optimizer):
    """A checked optimizer state with this run's implementation flags (fused, foreach, ...) in its
    param_groups instead of the saved ones, and none this torch does not know: an MPS run's state
    resumes fused on CUDA, and torch places the step counts where its fused kernel needs them."""
    groups = []
    for group, fresh in zip(saved["param_groups"], optimizer.state_dict()["param_groups"]):
        kept = {k: v for k, v in group.items() if k not in IMPLEMENTATION_FLAGS and k in fresh}
        groups.append({**kept, **{k: fresh[k] for k in IMPLEMENTATION_FLAGS if k in fresh}})
    return {"state": saved["state"], "param_groups": groups}


def restore(state, path, model, optimizer, scheduler, device, steps_per_epoch):
    """Load a checked resume state into the fresh model, optimizer and scheduler; return (history,
    first epoch, average, best)."""
    check_training_state(state, path, model, optimizer, scheduler, steps_per_epoch)
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(implementation_as_this_run(state["optimizer"], optimizer))
    scheduler.load_state_dict(state["scheduler"])
    average = state["average"]
    if average is not None:
        average = {k: v.to(device) for k, v in average.items()}
    return state["history"], state["epoch"] + 1, average, state["best"]


def check_kept_checkpoint(best, out, val_x, val_y, device, where):
    """With --select best-val the checkpoint at out holds the best epoch's weights: scored again on
    the validation split, it must reach the score the state records, or a raised score would keep
    an epoch that did not win. It may score higher: a kill between writing an improved checkpoint
    and the state leaves that epoch's weights there, and the resumed run writes them again. A
    hundredth is allowed: another device may round differently."""
    if not Path(out).exists():
        raise UserError(f"--resume: {where}: best names epoch {best['epoch']}, whose checkpoint {out} is "
                        f"missing{RESUME_FIX}")
    score = compute_metrics(val_y, predict(load_model(out, device), val_x, device))["balanced_accuracy"]
    if score < best["score"] - 0.01:
        raise UserError(f"--resume: {where}: best says epoch {best['epoch']} scored {best['score']:.4f} on the "
                        f"validation split, but {out} scores {score:.4f}{RESUME_FIX}")
