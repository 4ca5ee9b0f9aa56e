"""trainer.py on one device, timed and checked end to end: the CPU, a CUDA GPU or Apple's MPS.

    python bench/devices.py --device cuda            # a few minutes on a GPU
    python bench/devices.py --device cuda --quick    # under 5 minutes on a GPU
    python bench/devices.py --device cpu --quick     # the same checks on the CPU (slow: 10-20 minutes on 2 cores)

1. Speed: an epoch of each recipe (the default, --model best, --adversarial fgsm-rs), in float32
   and with --amp (and on CUDA with --deterministic), timed in this process with the trainer's
   own loop (trainer.run_epoch on the default training set, placed on the device) after a
   warm-up epoch, the device synchronized before and after, the variants taking turns epoch
   by epoch (3 rounds, --quick 1), median. Without --quick, and on a GPU also
   with it, the two recipes run end to end as a user runs them (`trainer.py --fix-labels none`
   and `--model best`: 60 and 15 epochs, each with its per-epoch dev scoring and saving), timed
   whole, against the targets for one GPU (60 epochs in 30 s, --model best in 15 s).
2. The round: trainer.py for a few epochs on a slice of the default data, killed with SIGKILL
   once its first epoch is saved, resumed with --resume, and compared with an uninterrupted run:
   bit for bit where the device promises it (the CPU; CUDA with --deterministic), reported
   otherwise (MPS). Then tester.py, adversarialExample.py --attack pgd and tester.py --explain
   (Grad-CAM) on the resumed checkpoint, on the device; the checkpoint must predict the same
   class on the CPU and the device for at least 98 % of 500 dev images.

Prints one table; exit status 1 if a check failed or a target was missed. Record results in
docs/benchmarks.md with the device's name.
"""
import argparse
import contextlib
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import devices  # noqa: E402
import trainer  # noqa: E402
from cli import UserError, pick_device, run_main  # noqa: E402
from dataset import DEV_PATH, TRAIN_PATH, ensure_data, load_pickle, save_pickle  # noqa: E402
from models import load_model, predict  # noqa: E402

RECIPES = {"default": [], "best": ["--model", "best"], "fgsm-rs": ["--adversarial", "fgsm-rs"]}
TARGETS = {"default": 30.0, "best": 15.0}  # seconds for the whole recipe on one GPU


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


@contextlib.contextmanager
def deterministic_mode(device, on):
    """trainer.py --deterministic's process-wide mode, on inside the block only (when on)."""
    if on:
        devices.deterministic(device)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(False)
        torch.backends.cudnn.deterministic = False


def epoch_timer(flags, device, images, labels, x, y):
    """time(k): seconds of epoch k of trainer.run_epoch for the recipe that flags select (k from 1; 0 warms up)."""
    args = trainer.parse_args([*flags, "--fix-labels", "none", "--device", str(device)])
    model = trainer.new_model(args, images, device, "bench")
    optimizer, scheduler = trainer.make_optimizer(model, args, 10**6)  # the schedule's length: any

    def time_epoch(k):
        with deterministic_mode(device, args.deterministic):
            synchronize(device)
            start = time.perf_counter()
            trainer.run_epoch(model, optimizer, scheduler, x, y, args, trainer.seeded(0, "bench", k), device)
            synchronize(device)
            return time.perf_counter() - start

    return time_epoch


def speed(device, images, labels, rounds, rows):
    """An epoch of each recipe in float32, with --amp (and on CUDA with --deterministic), the variants
    taking turns epoch by epoch (a machine's speed drifts; turns keep the ratios fair); medians."""
    variants = {"float32": [], "--amp": ["--amp"]}
    if device.type == "cuda":
        variants["--deterministic"] = ["--deterministic"]
    x, y = images.to(device), labels.to(device)
    for name, flags in RECIPES.items():
        timers = {variant: epoch_timer(flags + extra, device, images, labels, x, y) for variant, extra in variants.items()}
        for timer in timers.values():
            timer(0)  # warm-up: allocations, cuDNN's first calls
        times = {variant: [] for variant in variants}
        for k in range(1, rounds + 1):
            for variant, timer in timers.items():
                times[variant].append(timer(k))
        base = statistics.median(times["float32"])
        for variant, seconds in times.items():
            mid = statistics.median(seconds)
            rows.append((f"epoch of {name}, {variant}", f"{mid:.2f} s (median of {rounds})",
                         "ok" if variant == "float32" else f"ok: {base / mid:.2f}x float32's speed"))
            print(f"{rows[-1][0]:<44} {rows[-1][1]:<24} {rows[-1][2]}", flush=True)


def run(script, *args, timeout=1800):
    env = {**os.environ, "MPLBACKEND": "Agg", "PYTHONUNBUFFERED": "1"}
    return subprocess.run([sys.executable, str(ROOT / script), *map(str, args)], capture_output=True, text=True,
                          env=env, timeout=timeout)


def full_recipes(device, rows):
    for name, flags in (("default", []), ("best", ["--model", "best"])):
        with tempfile.TemporaryDirectory() as tmp:
            started = time.perf_counter()
            result = run("trainer.py", *flags, "--fix-labels", "none", "--device", device, "--out", f"{tmp}/m.ckpt",
                         "--figures", f"{tmp}/fig")
            wall = time.perf_counter() - started
            if result.returncode:
                rows.append((f"{name} recipe end to end", "failed", result.stderr.strip()[-300:]))
                continue
            report = json.loads(Path(tmp, "fig", "training.json").read_text())
            met = wall <= TARGETS[name] if device.type == "cuda" else None
            verdict = "ok" if met is None else "target met" if met else f"MISSED (target {TARGETS[name]:g} s on a GPU)"
            rows.append((f"{name} recipe end to end ({len(report['history'])} epochs)",
                         f"{wall:.1f} s wall, {report['train_seconds']:.1f} s training, balanced "
                         f"{report['final_dev']['balanced_accuracy']:.3f}", verdict))
        print(" ".join(rows[-1]), flush=True)


def weights(path):
    return torch.load(path, weights_only=True)["model_state_dict"]


def balanced(out):
    """tester.py's balanced accuracy, from the metrics JSON it wrote into out."""
    return json.loads(next(Path(out).glob("metrics_*.json")).read_text())["balanced_accuracy"]


def the_round(device, epochs, rows):
    """train -> kill -9 -> resume -> test -> attack -> Grad-CAM on device, against an uninterrupted run."""
    repeatable = device.type == "cpu" or device.type == "cuda"
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        x, y = load_pickle(TRAIN_PATH)
        dx, dy = load_pickle(DEV_PATH)
        save_pickle(tmp / "train.pickle", x[:1600], y[:1600])
        save_pickle(tmp / "dev.pickle", dx[:500], dy[:500])
        flags = ["--data", tmp / "train.pickle", "--dev-data", tmp / "dev.pickle", "--epochs", epochs,
                 "--fix-labels", "none", "--device", device, *(["--deterministic"] if device.type == "cuda" else [])]
        whole = run("trainer.py", *flags, "--out", tmp / "a" / "m.ckpt", "--figures", tmp / "a")
        if whole.returncode:
            rows.append(("uninterrupted run", "failed", whole.stderr.strip()[-300:]))
            return
        env = {**os.environ, "MPLBACKEND": "Agg"}
        proc = subprocess.Popen([sys.executable, str(ROOT / "trainer.py"), *map(str, flags), "--out",
                                 str(tmp / "b" / "m.ckpt"), "--figures", str(tmp / "b")],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
        state = tmp / "b" / "m.resume.pt"
        while not state.exists() and proc.poll() is None:
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        saved = torch.load(state, weights_only=True)["epoch"] if state.exists() else None
        if saved is None or saved >= epochs:
            rows.append(("kill -9, then --resume", "failed", f"the kill came {'too late' if saved else 'too early'}"))
            return
        resumed = run("trainer.py", *flags, "--out", tmp / "b" / "m.ckpt", "--figures", tmp / "b", "--resume")
        if resumed.returncode:
            rows.append(("kill -9, then --resume", "failed", resumed.stderr.strip()[-300:]))
            return
        a, b = weights(tmp / "a" / "m.ckpt"), weights(tmp / "b" / "m.ckpt")
        same = all(torch.equal(a[k], b[k]) for k in a)
        worst = max(float((a[k].double() - b[k].double()).abs().max()) for k in a)
        verdict = "ok" if same else "FAILED: promised identical" if repeatable else "not promised on this device"
        rows.append((f"kill -9 after epoch {saved} of {epochs}, then --resume",
                     "identical weights" if same else f"weights differ by up to {worst:.2e}", verdict))
        ckpt = tmp / "b" / "m.ckpt"
        tested = run("tester.py", "--checkpoint", ckpt, "--data", tmp / "dev.pickle", "--device", device, "--out",
                     tmp / "test")
        rows.append((f"tester.py on {device}", f"balanced accuracy {balanced(tmp / 'test'):.4f}"
                     if tested.returncode == 0 else "failed", "ok" if tested.returncode == 0 else tested.stderr[-300:]))
        # The same checkpoint predicts the same classes on the CPU and the device, but at near ties.
        model = load_model(ckpt)
        agree = float((predict(model, dx[:500], "cpu") == predict(model.to(device), dx[:500], device)).float().mean())
        rows.append(("same predictions on the CPU and the device", f"{agree:.1%} of 500 dev images",
                     "ok" if agree >= 0.98 else "FAILED: fewer than 98 %"))
        attacked = run("adversarialExample.py", "--checkpoint", ckpt, "--data", tmp / "dev.pickle", "--attack", "pgd",
                       "--steps", "5", "--epsilons", "0", "2/255", "8/255", "--examples", "2", "--device", device,
                       "--out", tmp / "adv")
        rows.append(("adversarialExample.py --attack pgd", "exit 0" if attacked.returncode == 0 else "failed",
                     "ok" if attacked.returncode == 0 and (tmp / "adv" / "adversarial.json").exists()
                     else attacked.stderr.strip()[-300:]))
        explained = run("tester.py", "--checkpoint", ckpt, "--data", tmp / "dev.pickle", "--explain", "--device", device,
                        "--out", tmp / "cam")
        drawn = list((tmp / "cam").glob("mistakes_*.png"))
        rows.append(("tester.py --explain (Grad-CAM)", "exit 0" if explained.returncode == 0 else "failed",
                     "ok" if explained.returncode == 0 and drawn else explained.stderr.strip()[-300:]))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:N, mps or auto (default: auto)")
    parser.add_argument("--quick", action="store_true",
                        help="one timed epoch per recipe and variant, a 2-epoch round, and on the CPU no full recipes")
    parser.add_argument("--cifar-dir", help="local CIFAR-10 copy used if the default data must be built")
    args = parser.parse_args()
    device = pick_device(args.device)
    ensure_data(TRAIN_PATH, DEV_PATH, cifar_dir=args.cifar_dir)
    images, labels = load_pickle(TRAIN_PATH)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else device.type
    print(f"bench/devices.py on {device} ({name}), torch {torch.__version__}, {torch.get_num_threads()} CPU threads",
          flush=True)
    rows, started = [], time.perf_counter()
    speed(device, images, labels, 1 if args.quick else 3, rows)
    if not args.quick or device.type != "cpu":
        full_recipes(device, rows)
    the_round(device, 2 if args.quick else 3, rows)
    print(f"\n{'check':<52} {'result':<44} verdict")
    for what, result, verdict in rows:
        print(f"{what:<52} {result:<44} {verdict}")
    failed = [row for row in rows if not row[2].startswith(("ok", "target met", "not promised"))]
    print(f"\n{len(rows) - len(failed)} of {len(rows)} checks passed in {time.perf_counter() - started:.0f} s")
    if failed:
        raise UserError(f"{len(failed)} check(s) failed: {', '.join(row[0] for row in failed)}")


if __name__ == "__main__":
    run_main(main)
