"""Signs of gradient masking in an ε sweep's results: the sanity line of adversarialExample.py.

A masked or obfuscated gradient makes a model look robust because the attack cannot find
the way, not because there is none (Athalye, Carlini & Wagner 2018).
"""
from attacks import eps_text

LARGE_EPSILON = 0.25  # at this ε (64/255) a working attack leaves almost no image correct
TOLERANCE = 0.01  # one point: smaller differences are noise of the random starts
SURVIVORS = 0.10  # a share of attacked images that no working attack leaves correct at a large ε


def masking_checks(summary, titles):
    """(problems, checks passed) about the attack's gradients, as sentences.

    A masked or obfuscated gradient makes a model look robust because the attack cannot
    find the way, not because there is none. Signs of it: the iterative attack doing no
    better than the single step, accuracy that rises with ε (before the sweep's running
    minimum hides it), accuracy that stays up at an ε where every image should fall, and
    an attack crafted on another model beating the white-box one.
    """
    results, problems, passed = summary["results"], [], []
    eps = [r["epsilon"] for r in results["fgsm"]]
    if "pgd" in results:
        weaker = [e for e, f, p in zip(eps, results["fgsm"], results["pgd"])
                  if p["accuracy_attacked_this_epsilon"] > f["accuracy_attacked_this_epsilon"] + TOLERANCE]
        if weaker:
            problems.append(f"{titles['pgd']} is weaker than FGSM at ε = {', '.join(map(eps_text, weaker))}")
        else:
            passed.append(f"{titles['pgd']} at least as strong as FGSM at every ε")
    for name in (n for n in ("fgsm", "pgd") if n in results):
        raw = [r["accuracy_attacked_this_epsilon"] for r in results[name]]
        rises = [i for i in range(len(raw) - 1) if raw[i + 1] > raw[i] + TOLERANCE]
        # A rise that ends below SURVIVORS inflates no robust number: a single large step that
        # overshoots and saturates pixels does that to a plain model (docs/robustness.md).
        masking = [i for i in rises if raw[i + 1] > SURVIVORS]
        if masking:
            a, b = eps[masking[0]], eps[masking[0] + 1]
            problems.append(f"{titles[name]} leaves more images correct at ε = {eps_text(b)} than at ε = {eps_text(a)}")
        elif rises:
            i = rises[0]
            passed.append(f"{titles[name]} rises from {raw[i]:.1%} at ε = {eps_text(eps[i])} to {raw[i + 1]:.1%} at "
                          f"ε = {eps_text(eps[i + 1])}, under {SURVIVORS:.0%}: a large single step's overshoot")
    # The model's own gradients must break (almost) every image at a large ε: the transfer
    # attack does not count here, it is the check below.
    large = [i for i, e in enumerate(eps) if e >= LARGE_EPSILON]
    if large:
        i = large[-1]
        left = min(results[n][i]["accuracy_attacked"] for n in ("fgsm", "pgd") if n in results)
        if left > SURVIVORS:
            problems.append(f"{left:.1%} of the attacked images survive ε = {eps_text(eps[i])}, where a "
                            "working attack leaves almost none")
        else:
            passed.append(f"{left:.1%} left at ε = {eps_text(eps[i])}")
    else:
        passed.append(f"(no ε ≥ {LARGE_EPSILON:g} in the sweep, so the large-ε check did not run)")
    if "transfer" in results:
        white = [min(results[n][i]["accuracy_attacked_this_epsilon"] for n in ("fgsm", "pgd") if n in results)
                 for i in range(len(eps))]
        beaten = [e for e, w, t in zip(eps, white, results["transfer"])
                  if t["accuracy_attacked_this_epsilon"] < w - TOLERANCE]
        if beaten:
            problems.append("the transfer attack beats the white-box attack at ε = " + ", ".join(map(eps_text, beaten)))
        else:
            passed.append("the transfer attack is no stronger than the white-box attack")
    return problems, passed


def sanity_line(summary, titles):
    problems, passed = masking_checks(summary, titles)
    if problems:
        return "sanity: WARNING, possible gradient masking (do not trust these robust numbers): " + "; ".join(problems)
    return "sanity: no sign of gradient masking: " + "; ".join(passed)
