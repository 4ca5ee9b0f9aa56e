"""What more processes buy (torchrun + DDP): wall time of label repair and of an epoch, and the accuracy reached.

    python bench/distributed.py                       # label repair and epochs: 1 vs 2 processes, 1 thread each
    python bench/distributed.py --settings 1x1 2x1 1x2    # and 1 process of 2 threads
    python bench/distributed.py --model best --repair-model best --epochs 2
    python bench/distributed.py --accuracy            # default recipe, dev balanced accuracy, 3 seeds, 1 vs 2 processes
    python bench/distributed.py --accuracy --fix-labels auto    # the same with label repair
    python bench/distributed.py --settings 1x1 4x1 --device cuda    # a machine with 4 GPUs: 1 vs 4 processes

Timing (the default): each setting PxT (P processes of T threads each) runs, in fresh
processes, the trainer's own label repair (label_repair.repair_labels with --repair-model's
fold models, as `--fix-labels auto` runs it; `--fix-labels none` leaves it out) and then
--epochs epochs of the trainer's loop (trainer.run_epoch; under torchrun on the
DistributedDataParallel model) on the default training data. P = 1 is `python`, as
`python trainer.py` runs; P > 1 is torchrun (gloo on the CPU, nccl on CUDA). The settings take
turns --rounds times, and each keeps its median; an epoch's time is the median of the epochs
after the first. Any trainer.py flag after the bench's own is passed on (--model, --batch-size ...).

Accuracy (--accuracy): the whole `trainer.py` run (the default recipe unless flags say
otherwise; add --fix-labels auto for label repair) per seed, once with 1 process and once
with torchrun's --processes, one thread each, the two interleaved; prints the final dev
balanced accuracy of each run and the mean and spread over the seeds.
"""
import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from cli import UserError, run_main  # noqa: E402
from dataset import DEV_PATH, TRAIN_PATH, ensure_data  # noqa: E402


def launch(processes, threads, script_args, cwd):
    """Run ROOT's python script_args with `processes` processes of `threads` threads; the CompletedProcess."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads), "MPLBACKEND": "Agg"}
    launcher = [sys.executable] if processes == 1 else \
        [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}"]
    result = subprocess.run([*launcher, *map(str, script_args)], cwd=cwd, env=env, capture_output=True, text=True)
    if result.returncode:
        raise UserError(f"{processes} process(es) of {' '.join(map(str, script_args[:1]))} failed:\n"
                        f"{result.stderr[-2000:]}")
    return result


# ---------------------------------------------------------------------------
# Timing: one setting, in the processes it starts


def worker(out, trainer_flags):
    """Runs in each process of one setting: label repair, then epochs; rank 0 writes the times to out."""
    import torch
    import torch.distributed as dist

    import ddp
    import trainer
    from dataset import load_pickle
    from label_repair import repair_labels

    def synchronized():
        """(wall clock, this process's CPU time), once every rank got here."""
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        if dist.is_initialized():
            dist.barrier()
        return time.perf_counter(), time.process_time()

    def since(start):
        wall, cpu = synchronized()
        return wall - start[0], cpu - start[1]

    args = trainer.parse_args(trainer_flags)
    device = ddp.setup(args.device)
    images, labels = load_pickle(args.data)
    result = {"processes": ddp.size(), "threads": torch.get_num_threads(), "device": str(device)}
    if args.fix_labels == "auto":
        start = synchronized()
        repair_labels(images, labels, args, device, trainer.fold_trainer(args, device))
        result["repair_seconds"], result["repair_cpu_seconds"] = since(start)
    model = trainer.new_model(args, images, device, "main")
    trained = ddp.wrap(model, device)
    optimizer, scheduler = trainer.make_optimizer(model, args, args.epochs * math.ceil(len(labels) / args.batch_size))
    result["epoch_seconds"], result["epoch_cpu_seconds"] = [], []
    for epoch in range(1, args.epochs + 1):
        start = synchronized()
        trainer.run_epoch(trained, optimizer, scheduler, images, labels, args, trainer.seeded(args.seed, "main", epoch),
                          device)
        for key, value in zip(("epoch_seconds", "epoch_cpu_seconds"), since(start)):
            result[key].append(value)
    if ddp.is_main():
        Path(out).write_text(json.dumps(result))


def timing(settings, rounds, trainer_flags):
    times = {setting: [] for setting in settings}
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(rounds):
            for processes, threads in settings:  # in turn: a machine whose speed drifts slows all alike
                out = Path(tmp) / "result.json"
                load = os.getloadavg()[0]
                launch(processes, threads, [Path(__file__), "--worker", out, *trainer_flags,
                                            "--figures", Path(tmp) / "figures"], ROOT)
                times[processes, threads].append({**json.loads(out.read_text()), "load": [load, os.getloadavg()[0]]})
                print(f"  {processes}x{threads}: {json.dumps(times[processes, threads][-1])}", file=sys.stderr,
                      flush=True)
    first = times[settings[0]]
    print(f"trainer.py {' '.join(trainer_flags)} on {first[0]['device']}; "
          f"median of {rounds} round(s), the settings in turn")
    print("wall: seconds on the clock (x faster: against the first setting); cpu: CPU seconds of rank 0's process. "
          "load: the machine's 1-minute load average before and after each measurement")
    print(f"{'processes x threads':<20} {'repair wall':>11} {'x faster':>9} {'cpu':>7} {'epoch wall':>11} "
          f"{'x faster':>9} {'cpu':>7}   load")

    def median(runs, key):
        if key not in runs[0]:
            return math.nan
        values = [r[key][1:] or r[key] if isinstance(r[key], list) else [r[key]] for r in runs]  # epochs after the 1st
        return statistics.median(v for run in values for v in run)

    base = None
    for setting in settings:
        runs = times[setting]
        row = [median(runs, key) for key in ("repair_seconds", "repair_cpu_seconds", "epoch_seconds",
                                              "epoch_cpu_seconds")]
        base = base or row
        loads = ", ".join(f"{a:.1f}-{b:.1f}" for a, b in (r["load"] for r in runs))
        print(f"{f'{setting[0]} x {setting[1]}':<20} {row[0]:>11.1f} {base[0] / row[0]:>9.2f} {row[1]:>7.1f} "
              f"{row[2]:>11.2f} {base[2] / row[2]:>9.2f} {row[3]:>7.2f}   {loads}")


# ---------------------------------------------------------------------------
# Accuracy: whole trainer.py runs, 1 process against several


def accuracy(seeds, processes, trainer_flags):
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for seed in seeds:
            row = {"seed": seed}
            for n in (1, processes):
                folder = Path(tmp) / f"seed{seed}-{n}"
                start = time.time()
                launch(n, 1, [ROOT / "trainer.py", *trainer_flags, "--seed", seed, "--out", folder / "model.ckpt",
                              "--figures", folder], ROOT)
                report = json.loads((folder / "training.json").read_text())
                row[n] = {"balanced": report["final_dev"]["balanced_accuracy"], "seconds": time.time() - start}
                print(f"  seed {seed}, {n} process(es): balanced {row[n]['balanced']:.4f} in {row[n]['seconds']:.0f}s",
                      file=sys.stderr, flush=True)
            rows.append(row)
    print(f"trainer.py {' '.join(trainer_flags) or '(default recipe)'}: final dev balanced accuracy, one thread per "
          f"process")
    print(f"{'seed':<6} {'1 process':>10} {f'{processes} processes':>12} {'difference':>11} {'wall s (1 / N)':>16}")
    for row in rows:
        print(f"{row['seed']:<6} {row[1]['balanced']:>10.4f} {row[processes]['balanced']:>12.4f} "
              f"{row[processes]['balanced'] - row[1]['balanced']:>+11.4f} "
              f"{row[1]['seconds']:>8.0f} / {row[processes]['seconds']:.0f}")
    for n in (1, processes):
        values = [row[n]["balanced"] for row in rows]
        print(f"{n} process(es): mean {statistics.mean(values):.4f} (min {min(values):.4f}, max {max(values):.4f})")


def setting(text):
    try:
        processes, threads = (int(part) for part in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected PROCESSESxTHREADS such as 2x1, got {text!r}") from None
    if processes < 1 or threads < 1:
        raise argparse.ArgumentTypeError(f"expected at least 1 process and 1 thread, got {text!r}")
    return processes, threads


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--settings", type=setting, nargs="+", default=[(1, 1), (2, 1)],
                        help="timing: processes x threads each, the first the base; 1x2 is python trainer.py on "
                             "two cores (default: 1x1 2x1)")
    parser.add_argument("--rounds", type=int, default=2, help="timing: measurements per setting (default: 2)")
    parser.add_argument("--epochs", type=int, help="epochs per run (default: 3 for timing, the recipe's for accuracy)")
    parser.add_argument("--accuracy", action="store_true", help="whole runs: dev accuracy of 1 process against N")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="accuracy: seeds (default: 0 1 2)")
    parser.add_argument("--processes", type=int, default=2, help="accuracy: processes to compare with 1 (default: 2)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args, trainer_flags = parser.parse_known_args()
    if args.epochs is not None or not args.accuracy:
        trainer_flags = ["--epochs", str(args.epochs or 3), *trainer_flags]
    if not args.accuracy:  # timing always includes label repair (opt-in in trainer.py); a later flag wins
        trainer_flags = ["--fix-labels", "auto", *trainer_flags]
    if args.worker:
        return worker(args.worker, trainer_flags)
    if "--data" not in trainer_flags:
        ensure_data(TRAIN_PATH, DEV_PATH)
    if args.accuracy:
        accuracy(args.seeds, args.processes, trainer_flags)
    else:
        timing(args.settings, args.rounds, trainer_flags)


if __name__ == "__main__":
    if "--worker" in sys.argv:
        import ddp

        ddp.run_main(main)
    else:
        run_main(main)
