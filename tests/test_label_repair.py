"""label_repair.py: the decision rule on hand-made probabilities, and repair as shipped on the default data."""
import json

import pytest
import torch

import label_repair
import trainer
from dataset import CLASSES, class_counts, load_pickle

CAR, TRUCK, CAT = range(3)


def balanced_view(q, labels):
    """What fold models trained with the balanced sampler report for posteriors q under the labels' prior:
    p proportional to q / prior (every class drawn equally often)."""
    shares = torch.tensor(class_counts(labels), dtype=torch.float) / len(labels)
    p = q / shares
    return p / p.sum(1, keepdim=True)


def hand_made(seed=0):
    """Probabilities q under the labels' own prior for 1,040 images: 700 cars, 60 cats labeled "car"
    (label noise, one way), 50 trucks (a hard class: often more car than truck), 200 cats and 30
    cats that look a little like trucks (q still says cat), each group jittered."""
    g = torch.Generator().manual_seed(seed)
    groups = [((0.93, 0.02, 0.05), CAR, 700), ((0.10, 0.01, 0.89), CAR, 60), ((0.55, 0.40, 0.05), TRUCK, 50),
              ((0.06, 0.01, 0.93), CAT, 200), ((0.03, 0.40, 0.57), CAT, 30)]
    q = torch.cat([(torch.tensor(m).log() + 0.5 * torch.randn(n, 3, generator=g)).softmax(1) for m, _, n in groups])
    labels = torch.cat([torch.full((n,), label) for _, label, n in groups])
    return q, labels


def test_the_labels_own_prior_is_recovered_from_balanced_probabilities():
    # 3,000 images whose labels are drawn from q: q is exactly their probability under the labels' prior.
    g = torch.Generator().manual_seed(0)
    prior = torch.tensor([0.72, 0.06, 0.22])
    true = torch.multinomial(prior, 3000, replacement=True, generator=g)
    logits = torch.tensor([[2.5, 0.0, 0.0], [1.8, 1.5, 0.0], [0.0, 0.7, 2.5]])[true] + torch.randn(3000, 3, generator=g)
    q = (logits + prior.log()).softmax(1)
    labels = torch.multinomial(q, 1, generator=g).flatten()
    p = balanced_view(q, labels)
    assert (p - q).abs().max() > 0.5  # the sampler's view is far from it ...
    assert (label_repair.prior_calibrated(p, labels) - q).abs().max() < 0.1  # ... and the fit brings it back


def test_the_balanced_prior_cannot_relabel_into_the_rare_class():
    q, labels = hand_made()
    p = balanced_view(q, labels)
    naive = (p.argmax(1) != labels).nonzero().flatten()  # relabel to the fold models' argmax
    into_truck = naive[p[naive].argmax(1) == TRUCK]
    assert (q[into_truck].argmax(1) != TRUCK).sum() > 30  # into truck against the labels' own prior
    issues, suggested, _, act, why = label_repair.find_label_repairs(labels, p)
    acted = dict(zip(issues[act].tolist(), suggested[act].tolist()))
    assert all(q[i].argmax() == s for i, s in acted.items())  # only what the labels' prior suggests too
    assert sum(acted.get(i) == CAT for i in range(700, 760)) >= 45  # the one-way noise is put right
    assert set(why) <= {"", label_repair.KEPT_TWO_WAY, label_repair.KEPT_PRIOR}


def test_a_confusion_both_ways_is_kept_even_where_both_priors_agree():
    # 600 cars, 300 trucks and 300 cats; 60 cars look like trucks and 60 trucks like cars, and under
    # either prior the suggestion is the other class: a model's two-way confusion, not label noise.
    g = torch.Generator().manual_seed(1)
    groups = [((0.90, 0.05, 0.05), CAR, 540), ((0.15, 0.80, 0.05), CAR, 60), ((0.05, 0.90, 0.05), TRUCK, 240),
              ((0.80, 0.15, 0.05), TRUCK, 60), ((0.05, 0.05, 0.90), CAT, 300)]
    q = torch.cat([(torch.tensor(m).log() + 0.3 * torch.randn(n, 3, generator=g)).softmax(1) for m, _, n in groups])
    labels = torch.cat([torch.full((n,), label) for _, label, n in groups])
    issues, suggested, _, act, why = label_repair.find_label_repairs(labels, balanced_view(q, labels))
    confused = {*range(540, 600), *range(840, 900)}
    flagged = [k for k, i in enumerate(issues.tolist()) if i in confused]
    assert len(flagged) >= 60  # cleanlab flags most of them ...
    assert not act[flagged].any() and {why[k] for k in flagged} == {label_repair.KEPT_TWO_WAY}  # ... none is acted on
    assert label_repair.find_label_repairs(labels, balanced_view(q, labels), pairs="all")[3][flagged].all()


def test_pair_summary_counts_every_flag_once():
    summary = label_repair.pair_summary([0, 0, 0, 2], [2, 2, 1, 1], ["", label_repair.KEPT_PRIOR, label_repair.KEPT_TWO_WAY, ""])
    assert summary == {
        "car->cat": {"flagged": 2, "acted_on": 1, "kept": {label_repair.KEPT_PRIOR: 1}},
        "car->truck": {"flagged": 1, "acted_on": 0, "kept": {label_repair.KEPT_TWO_WAY: 1}},
        "cat->truck": {"flagged": 1, "acted_on": 1, "kept": {}},
    }


class FoldRecorder(torch.nn.Module):
    """A stand-in fold model: remembers which images it trained on and which it was asked to predict
    (image i is filled with i / 100), and answers class i % 3 for image i."""

    def __init__(self, trained):
        super().__init__()
        self.trained, self.predicted = set(trained), set()

    def forward(self, x):
        ids = (x[:, 0, 0, 0] * 100).round().long()
        self.predicted |= set(ids.tolist())
        return torch.nn.functional.one_hot(ids % 3, 3).float() * 10


def test_every_image_is_predicted_by_a_fold_model_that_never_saw_it():
    # README: "4-fold cross-validation gives every training image a prediction from a model that never saw it".
    n = 80
    images = (torch.arange(n).float() / 100)[:, None, None, None].expand(n, 3, 32, 32).contiguous()
    labels = torch.tensor([0, 1, 2, 0] * (n // 4))
    folds = []

    def train_fold(fold_images, fold_labels, name):
        folds.append(FoldRecorder((fold_images[:, 0, 0, 0] * 100).round().long().tolist()))
        return folds[-1]

    probs = label_repair.out_of_fold_probabilities(images, labels, 4, 0, train_fold, "cpu")
    assert len(folds) == 4
    for fold in folds:
        assert len(fold.trained) == 60 and len(fold.predicted) == 20 and not fold.trained & fold.predicted
    assert sorted(i for fold in folds for i in fold.predicted) == list(range(n))  # each image once
    assert probs.argmax(1).tolist() == [i % 3 for i in range(n)]  # each image's own prediction, in its row


@pytest.fixture(scope="module")
def default_repair(default_data, tmp_path_factory):
    """`trainer.py --fix-labels auto` as shipped (4 folds of SimpleModel, 8 epochs each, seed 0) on the
    default data (600 of the 2,000 training cats labeled car), and the build's own list of them."""
    figures = tmp_path_factory.mktemp("repair")
    images, given = load_pickle(default_data / "train.pickle")
    args = trainer.parse_args(["--data", str(default_data / "train.pickle"), "--figures", str(figures),
                               "--fix-labels", "auto"])
    # One thread, as the docs measured: the same numbers on any machine with this torch build, and
    # on a busy 2-core machine five times faster than two threads that wait for each other.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        repaired, keep = label_repair.repair_labels(images, given, args, "cpu", trainer.fold_trainer(args, "cpu"))
    finally:
        torch.set_num_threads(threads)
    manifest = json.loads((default_data / "manifest.json").read_text())
    true = given.clone()
    for entry in manifest["mislabeled"]:
        true[entry["index"]] = CLASSES.index(entry["true"])
    return given, true, repaired, keep, json.loads((figures / "label_issues.json").read_text())


def test_repair_puts_the_planted_errors_right_at_the_precision_the_docs_claim(default_repair):
    # README and docs/label_repair.md: "It puts 78-83 % of the planted errors right at 89-90 %
    # precision"; 9 runs measured 0.887-0.904 precision, 0.783-0.828 recall, and 97.1-97.5 % of
    # the labels right afterwards (90.6 % as given). This run (seed 0, one thread): 0.904 and 0.802, as
    # the docs' table; seeds 0-2 on two threads: 0.896-0.908 and 0.793-0.815.
    # The floors leave about two points for other machines' arithmetic.
    given, true, repaired, keep, _ = default_repair
    assert int((given != true).sum()) == 600
    changed = repaired != given
    right = changed & (repaired == true)
    precision, recall = int(right.sum()) / max(1, int(changed.sum())), int(right.sum()) / 600
    assert precision >= 0.87 and recall >= 0.76, (precision, recall)
    assert float((repaired == true).float().mean()) >= 0.965
    assert keep.all()  # relabel, not drop


def test_repair_of_one_way_noise_acts_only_on_that_pair(default_repair):
    # The only noise planted: cats labeled car. Any other relabel is a new error; the docs measured at
    # most 4 (cat -> truck) per run, against 81 and 84 with the rule before the prior check.
    given, true, repaired, _, _ = default_repair
    changed = (repaired != given).nonzero().flatten().tolist()
    pairs = {}
    for i in changed:
        pair = (CLASSES[given[i]], CLASSES[repaired[i]])
        pairs[pair] = pairs.get(pair, 0) + 1
    assert pairs.get(("car", "cat"), 0) >= 450, pairs
    assert sum(n for pair, n in pairs.items() if pair != ("car", "cat")) <= 10, pairs
    # What it changed is the build's planted noise, with few exceptions: cats labeled car.
    assert sum(int(true[i]) == CLASSES.index("cat") for i in changed) >= 0.87 * len(changed)


def test_the_reports_per_pair_counts_are_the_relabels_applied(default_repair):
    given, _, repaired, _, report = default_repair
    applied = {}
    for i in (repaired != given).nonzero().flatten().tolist():
        name = f"{CLASSES[given[i]]}->{CLASSES[repaired[i]]}"
        applied[name] = applied.get(name, 0) + 1
    assert applied and {name: p["acted_on"] for name, p in report["pairs"].items() if p["acted_on"]} == applied
    assert report["acted_on"] == sum(applied.values()) == sum(issue["acted"] for issue in report["issues"])
    assert sum(p["flagged"] for p in report["pairs"].values()) == report["flagged"] == len(report["issues"])
    acted = {issue["index"]: issue["suggested"] for issue in report["issues"] if issue["acted"]}
    assert acted == {i: CLASSES[repaired[i]] for i in (repaired != given).nonzero().flatten().tolist()}
    for issue in report["issues"]:
        assert issue["acted"] == ("kept_because" not in issue)
        assert issue["given"] == CLASSES[given[issue["index"]]]
