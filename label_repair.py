"""Label repair for trainer.py --fix-labels: find the training images whose given label is probably wrong.

    --fix-labels auto    K-fold out-of-fold probabilities, then confident learning (cleanlab)
    --fix-labels FILE    your own JSON list of {"index": i, "label": "cat" | 2 | null}, or the
                         label_issues.json of an earlier auto run (the flags it acted on, relabeled)
    --fix-labels none    the labels as given (the default)

Confident learning flags an image when its out-of-fold probability for another class beats
that class's own typical confidence (Northcutt et al. 2021). Two checks decide which flags
are acted on:

* the pair runs one way (directional_pairs): label noise, cats filed as "car", runs one way;
  a model that mixes up cars and trucks errs both ways;
* the suggestion holds under both priors (prior_calibrated): the fold models train with the
  balanced sampler, so their probabilities assume equal classes and over-suggest the rare
  ones (truck); re-expressed under the training labels' own prior they over-suggest the
  common one (car). A label is changed only where both views suggest the same class, so
  neither prior's bias can change a label on its own.

docs/label_repair.md has the measurements behind both.
"""
import json
import math
import sys
import time
from pathlib import Path

import torch

import ddp
from cli import UserError, atomic_write, clip, describe, int_in, one_line, pyplot, save_figure
from dataset import CLASSES, class_counts
from images import to_unit
from models import predict
from untrusted import read_input_file


def add_repair_args(parser, fold_models):
    """The --fix-labels and --repair-* flags; fold_models names the recipes --repair-model may pick."""
    group = parser.add_argument_group("label repair")
    # Off by default: on the default data, repair lowered dev balanced accuracy on two seeds of
    # three (docs/label_repair.md), and a default must be at least as good on every seed.
    group.add_argument("--fix-labels", default="none", metavar="auto|none|FILE",
                       help="auto: find and relabel probable label errors (opt-in); none: keep labels; FILE: JSON list "
                            "of {index, label} corrections, or the label_issues.json of an earlier auto run (the "
                            "flags it acted on, relabeled as suggested) (default: none)")
    group.add_argument("--repair-folds", type=int_in(2, 100), default=4,
                       help="cross-validation folds for --fix-labels auto (default: 4)")
    group.add_argument("--repair-epochs", type=int_in(1, 10_000),
                       help="epochs per fold model for --fix-labels auto (default: 8 simple, 10 best)")
    group.add_argument("--repair-model", choices=fold_models, default="simple",
                       help="fold model of --fix-labels auto: simple (fast) or best (the --model best recipe: "
                            "better repair, minutes longer) (default: simple)")
    group.add_argument("--repair-action", choices=("relabel", "drop"), default="relabel",
                       help="what to do with the images found (default: relabel)")
    group.add_argument("--repair-pairs", choices=("directional", "all"), default="directional",
                       help="directional: act only on one-way confusions (label noise), not on classes the "
                            "model mixes up both ways, and only where the labels' own prior suggests the same class; "
                            "all: act on every flag (default: directional)")


def check_repairable(labels, args):
    """Automatic repair needs every class in every fold: refuse up front, not inside scikit-learn."""
    if args.fix_labels != "auto":
        return
    counts = dict(zip(CLASSES, class_counts(labels)))
    short = {name: n for name, n in counts.items() if n < args.repair_folds}
    if short:
        shown = ", ".join(f"{name} {n}" for name, n in short.items())
        raise UserError(f"--fix-labels auto with {args.repair_folds} folds needs at least {args.repair_folds} "
                        f"images of each class, and {args.data} has {shown}; use fewer --repair-folds or "
                        "--fix-labels none")


def out_of_fold_probabilities(images, labels, folds, seed, train_fold, device):
    """Predicted probabilities for every training image from a model that never trained on it.

    train_fold(images, labels, name) returns a model trained on one fold's training part; fold
    k's model depends only on the seed and k. Under torchrun the folds are dealt out to the
    processes (fold k to rank k mod N) and their probabilities gathered in fold order, so the
    result is the same for any number of processes, in about 1/N of the time.
    """
    from sklearn.model_selection import StratifiedKFold

    splits = [(torch.from_numpy(train_idx), torch.from_numpy(held_idx)) for train_idx, held_idx in
              StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed).split(labels.numpy(), labels.numpy())]
    start = time.time()

    def agreement(k, fold_probs):
        held_idx = splits[k][1]
        return f"  fold {k + 1}/{folds}: held-out agreement with given labels " \
               f"{(fold_probs.argmax(1) == labels[held_idx]).float().mean():.3f}"

    def held_out_probabilities(k):
        train_idx, held_idx = splits[k]
        try:
            model = train_fold(images[train_idx], labels[train_idx], f"fold{k + 1}")
        except FloatingPointError as e:
            raise UserError(f"label repair: fold model {k + 1} diverged ({e}); use --repair-model simple, or "
                            "--fix-labels none") from None
        fold_probs = predict(model, images[held_idx], device, flip=True, probabilities=True)
        print(f"{agreement(k, fold_probs)} ({time.time() - start:.0f}s)", file=sys.stderr)
        return fold_probs

    probs = torch.zeros(len(labels), len(CLASSES))
    for k, fold_probs in enumerate(ddp.spread(held_out_probabilities, range(folds))):
        probs[splits[k][1]] = fold_probs
        if k % ddp.size() != ddp.rank():  # trained by another process, which prints nothing
            print(f"{agreement(k, fold_probs)} (process {k % ddp.size()})", file=sys.stderr)
    return probs


def find_label_issues(labels, probs):
    """Confident learning (cleanlab): indices whose given label is probably wrong, most certain first."""
    from cleanlab.filter import find_label_issues as cleanlab_find

    # n_jobs=1: no pool of processes forked from one that holds torch's threads (under torchrun also
    # gloo's: such a fork can hang). The result does not depend on n_jobs, and at this size one job is the fastest.
    return torch.from_numpy(
        cleanlab_find(labels.numpy(), probs.numpy(), return_indices_ranked_by="self_confidence", n_jobs=1).copy()
    ).long()


def prior_calibrated(probs, labels):
    """probs re-expressed under the class prior of the given labels: a temperature and a bias per class
    on the log-probabilities, fitted by maximum likelihood of the given labels (bias-corrected
    temperature scaling, Alexandari et al. 2020). Confident learning assumes probabilities of
    this kind (Northcutt et al. 2021); fold models that trained with the balanced sampler give
    probabilities under equal class priors instead."""
    logp = probs.double().clamp_min(1e-12).log()
    bias = torch.zeros(probs.shape[1], dtype=torch.double, requires_grad=True)
    log_temperature = torch.zeros((), dtype=torch.double, requires_grad=True)
    optimizer = torch.optim.LBFGS([bias, log_temperature], max_iter=200, line_search_fn="strong_wolfe")

    def nll():
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(logp / log_temperature.exp() + bias, labels)
        loss.backward()
        return loss

    with torch.enable_grad():
        optimizer.step(nll)
    with torch.no_grad():
        return (logp / log_temperature.exp() + bias).softmax(1).float()


def directional_pairs(given, suggested, class_sizes, factor=3.0):
    """Which flagged (given -> suggested) pairs look like label noise rather than model confusion.

    A classifier that mixes up two classes (car and truck) is wrong both ways, and relabeling
    those flags teaches it the confusion; label noise (cats filed as "car") runs one way. A
    pair passes when its flag rate (flags / images given that label) is at least `factor`
    times the rate of the reverse pair, and so is its count of flags. The count matters for
    strong fold models: their few errors on a rare class (30 of 400 trucks taken for cars)
    are a high rate against the reverse (80 of 4,600 cars taken for trucks) but no majority
    of the flags. Returns a [C, C] boolean matrix.
    """
    num_classes = len(class_sizes)
    flags = torch.zeros(num_classes, num_classes)
    flags.index_put_((given, suggested), torch.ones(len(given)), accumulate=True)
    rate = flags / class_sizes.clamp(min=1).float()[:, None]
    return (flags > 0) & (rate >= factor * rate.T) & (flags >= factor * flags.T)


KEPT_TWO_WAY = "two-way: the model confuses these classes both ways"
KEPT_PRIOR = "not suggested under the labels' own prior"


def find_label_repairs(labels, probs, pairs="directional"):
    """Flag probable label errors and decide which to act on.

    Returns (indices, suggested labels, confidence, act mask, why kept): for each flagged image,
    most certain first, why it is not acted on ("" when it is). pairs="all" acts on every flag.
    """
    issues = find_label_issues(labels, probs)
    suggested = probs[issues].argmax(1)
    confidence = probs[issues, suggested]
    why = [""] * len(issues)
    if pairs != "all":
        one_way = directional_pairs(labels[issues], suggested, torch.tensor(class_counts(labels)))
        agrees = prior_calibrated(probs, labels)[issues].argmax(1) == suggested
        why = [KEPT_TWO_WAY if not one_way[g, s] else "" if a else KEPT_PRIOR
               for g, s, a in zip(labels[issues].tolist(), suggested.tolist(), agrees.tolist())]
    act = torch.tensor([not w for w in why], dtype=torch.bool)
    return issues, suggested, confidence, act, why


def pair_summary(given, suggested, why):
    """Per (given -> suggested) pair: flagged, acted on, and how many were kept for each reason."""
    pairs = {}
    for g, s, w in zip(given, suggested, why):
        entry = pairs.setdefault(f"{CLASSES[g]}->{CLASSES[s]}", {"flagged": 0, "acted_on": 0, "kept": {}})
        entry["flagged"] += 1
        if w:
            entry["kept"][w] = entry["kept"].get(w, 0) + 1
        else:
            entry["acted_on"] += 1
    return dict(sorted(pairs.items(), key=lambda item: -item[1]["flagged"]))


def _as_written(value):
    """A JSON value as the file wrote it, or described when it is long or deep."""
    if value is None or isinstance(value, (bool, float)) or (isinstance(value, int) and value.bit_length() <= 128):
        return json.dumps(value)
    return json.dumps(clip(value)) if isinstance(value, str) else describe(value)


class _RepeatedKey(ValueError):
    """A key given twice in one JSON object: valid JSON, but an ambiguous correction."""


def _unique_keys(pairs):
    """A JSON object as a dict; a key given twice is an error (json keeps the last, silently)."""
    seen = set()
    for key, _ in pairs:
        if key in seen:
            raise _RepeatedKey(f"the key {clip(key)!r} appears twice in one object; json would keep the last silently")
        seen.add(key)
    return dict(pairs)


def read_corrections(path, n):
    """A hand-made list of corrections: [{"index": i, "label": "cat" | 2 | null}, ...]; null drops the image.
    A label_issues.json written by --fix-labels auto is read as the list of its acted-on issues, each
    relabeled as suggested (whatever --repair-action that run had).

    Strict on purpose: an index of 1.9 or a label of true is a mistake to report, not a value
    to truncate, and an index listed twice would silently keep only one of the two labels.
    """
    where = f"--fix-labels {path}"
    data = read_input_file(path, "label corrections")
    # Parsed JSON takes about 24 times the file's bytes: refuse what cannot be one entry per image
    # (a label_issues.json entry is about 200 bytes) before parsing it.
    limit = 2**20 + 1024 * n
    if len(data) > limit:
        raise UserError(f"{where}: {len(data):,} bytes, more than corrections of {n:,} images take ({limit:,})")
    try:
        entries = json.loads(data.decode("utf-8"), object_pairs_hook=_unique_keys)
    except RecursionError:  # valid JSON, but nested deeper than Python's parser goes
        raise UserError(f"{where}: nested too deeply to read; a corrections file is a flat list of "
                        "{\"index\": i, \"label\": name} entries") from None
    except _RepeatedKey as e:
        raise UserError(f"{where}: {e}") from None
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError, ints past Python's 4,300 digits
        if "integer string conversion" in str(e):
            raise UserError(f"{where}: holds a number of more than 4,300 digits, which no image index or label "
                            "is") from None
        raise UserError(f"{where}: not valid JSON ({one_line(e, 100)})") from None
    if isinstance(entries, dict) and isinstance(entries.get("issues"), list):  # our own label_issues.json
        try:
            entries = [{"index": e["index"], "label": e["suggested"]} for e in entries["issues"]
                       if e.get("acted", True) is not False]
        except (TypeError, KeyError, AttributeError):
            raise UserError(f"{where}: a label_issues.json whose issues lack index or suggested") from None
    if not isinstance(entries, list):
        raise UserError(f"{where}: expected a list of {{\"index\": i, \"label\": name}} entries")
    fixes, seen = {}, {}
    for k, entry in enumerate(entries):
        if not isinstance(entry, dict) or set(entry) != {"index", "label"}:
            raise UserError(f"{where}: entry {k} must be an object with exactly the keys index and label")
        index, label = entry["index"], entry["label"]
        if not isinstance(index, int) or isinstance(index, bool) or not 0 <= index < n:
            raise UserError(f"{where}: entry {k}: index {_as_written(index)} is not a whole number from 0 to {n - 1}")
        if isinstance(label, str) and label in CLASSES:
            label = CLASSES.index(label)
        elif label is not None and not (isinstance(label, int) and not isinstance(label, bool)
                                        and 0 <= label < len(CLASSES)):
            raise UserError(f"{where}: entry {k}: label {_as_written(label)} is not one of {', '.join(CLASSES)}, "
                            "0-2, or null (drop the image)")
        if index in seen:
            raise UserError(f"{where}: entries {seen[index]} and {k} both correct image {index}; keep one")
        seen[index] = k
        fixes[index] = label
    return fixes


def plot_flagged(images, given, suggested, confidence, path, limit=40):
    plt = pyplot()

    n = min(limit, len(given))
    cols = 8
    rows = max(1, math.ceil(n / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(cols * 1.3, rows * 1.55), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for k in range(n):
        ax = axes.flat[k]
        ax.imshow(to_unit(images[k]).permute(1, 2, 0).clamp(0, 1).numpy())
        ax.set_title(f"{CLASSES[given[k]]}\u2192{CLASSES[suggested[k]]}\n{confidence[k]:.2f}", fontsize=8)
    fig.suptitle(f"Probable label errors (given \u2192 suggested, confidence); {n} of {len(given)} shown")
    fig.tight_layout()
    save_figure(fig, path, dpi=110)


def hand_made_labels(labels, fix_labels):
    """(labels, keep, corrections applied) for --fix-labels none or FILE: the given labels, with the
    file's corrections (null drops an image)."""
    labels, keep = labels.clone(), torch.ones(len(labels), dtype=torch.bool)
    fixes = {} if fix_labels == "none" else read_corrections(fix_labels, len(labels))
    for index, label in fixes.items():
        if label is None:
            keep[index] = False
        else:
            labels[index] = label
    return labels, keep, len(fixes)


def repair_labels(images, labels, args, device, train_fold):
    """Apply --fix-labels; return (labels to train on, mask of images to keep).

    train_fold(images, labels, name) trains one fold model of --fix-labels auto.
    """
    if args.fix_labels != "auto":
        labels, keep, applied = hand_made_labels(labels, args.fix_labels)
        if args.fix_labels != "none":
            print(f"Applied {applied} label corrections from {args.fix_labels} "
                  f"({int((~keep).sum())} images dropped)", file=sys.stderr)
        return labels, keep
    labels, keep = labels.clone(), torch.ones(len(labels), dtype=torch.bool)

    start = time.time()
    print(f"Label repair: {args.repair_folds}-fold out-of-fold predictions "
          f"({args.repair_model} fold models, {args.repair_epochs} epochs per fold) ...", file=sys.stderr)
    probs = out_of_fold_probabilities(images, labels, args.repair_folds, args.seed, train_fold, device)
    issues, suggested, confidence, act, why = find_label_repairs(labels, probs, args.repair_pairs)
    pairs = pair_summary(labels[issues].tolist(), suggested.tolist(), why)
    report = {
        "method": f"confident learning (cleanlab) on {args.repair_folds}-fold out-of-fold probabilities; "
                  + ("acting on every flag" if args.repair_pairs == "all" else
                     "acting on one-way pairs where the labels' own prior suggests the same class"),
        "action": args.repair_action,
        "flagged": len(issues),
        "acted_on": int(act.sum()),
        "pairs": pairs,
        "issues": [
            {"index": i, "given": CLASSES[labels[i]], "suggested": CLASSES[s], "confidence": round(c, 4), "acted": a,
             **({"kept_because": w} if w else {})}
            for i, s, c, a, w in zip(issues.tolist(), suggested.tolist(), confidence.tolist(), act.tolist(), why)
        ],
    }
    figures = Path(args.figures)
    fix, to = issues[act], suggested[act]
    if ddp.is_main():  # one writer under torchrun
        atomic_write(figures / "label_issues.json", lambda f: f.write(json.dumps(report, indent=1).encode()))
        plot_flagged(images[fix], labels[fix].tolist(), to.tolist(), confidence[act].tolist(),
                     figures / "label_issues.png")
    summary = "; ".join(f"{name} {p['acted_on']} of {p['flagged']}" + "".join(
        f", {n} kept ({'two-way' if w == KEPT_TWO_WAY else 'not under the labels prior'})" for w, n in p["kept"].items())
        for name, p in pairs.items())
    print(f"Label repair: {len(issues)} flagged in {time.time() - start:.0f}s, {args.repair_action} {len(fix)}: "
          f"{summary or 'nothing'} (list: {figures / 'label_issues.json'})", file=sys.stderr)
    if args.repair_action == "relabel":
        labels[fix] = to
    else:
        keep[fix] = False
    return labels, keep
