"""Training throughput: the trainer's loop against a naive DataLoader pipeline and pure compute.

    python bench/train_throughput.py [--steps 300] [--data data/train.pickle]

Measures images/second, in one run, of
  (a) trainer.run_epoch: tensor-held data, balanced sampler, batched augmentation, train step;
  (b) the naive way: a per-sample Dataset converting each image to PIL and applying torchvision
      transforms, through a DataLoader with 2 workers, same model, batch size and sampler;
  (c) the train step alone on pre-made batches (no data work at all);
and prints the ratios a/b (target >= 5) and a/c (target >= 0.9).
"""
import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, WeightedRandomSampler
from torchvision import transforms

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import trainer  # noqa: E402
from cli import run_main  # noqa: E402
from dataset import TRAIN_PATH, ensure_data, load_pickle  # noqa: E402
from images import to_unit  # noqa: E402


class PilDataset(Dataset):
    """The tutorial pipeline: one image at a time, through PIL and torchvision transforms."""

    def __init__(self, images, labels):
        self.images, self.labels = images, labels
        self.to_pil = transforms.ToPILImage()
        self.transform = transforms.Compose([
            transforms.RandomHorizontalFlip(),
            transforms.RandomAffine(10, translate=(0.1, 0.1)),
            transforms.ColorJitter(0.2, 0.2, 0.2),
            transforms.ToTensor(),
            transforms.Normalize((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
        ])

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return self.transform(self.to_pil(to_unit(self.images[i]))), self.labels[i]


def train_step(model, optimizer, x, y):
    loss = F.cross_entropy(model(x), y)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()


def trainer_args(args):
    return trainer.parse_args(["--batch-size", str(args.batch_size), "--schedule", "constant"])


def fresh(images, args):
    """SimpleModel, optimizer and schedule exactly as the trainer builds them (channels-last
    layout, fused Adam), so that the three pipelines differ only in how batches are made."""
    run_args = trainer_args(args)
    model = trainer.new_model(run_args, images, "cpu", "bench")
    optimizer, scheduler = trainer.make_optimizer(model, run_args, 10**6)  # constant schedule: any length
    return model, optimizer, scheduler


def bench_trainer(images, labels, args):
    run_args = trainer_args(args)
    model, optimizer, scheduler = fresh(images, args)
    generator = torch.Generator().manual_seed(0)
    trainer.run_epoch(model, optimizer, scheduler, images, labels, run_args, generator, "cpu", max_steps=20)
    start = time.perf_counter()
    steps = len(trainer.run_epoch(model, optimizer, scheduler, images, labels, run_args, generator, "cpu",
                                  max_steps=args.steps))
    return steps * args.batch_size / (time.perf_counter() - start)


def bench_naive(images, labels, args):
    model, optimizer, _ = fresh(images, args)
    model.train()
    sampler = WeightedRandomSampler(trainer.balanced_weights(labels), (args.steps + 20) * args.batch_size,
                                    replacement=True)
    loader = DataLoader(PilDataset(images, labels), batch_size=args.batch_size, sampler=sampler, num_workers=2,
                        persistent_workers=True)
    batches = iter(loader)
    for _ in range(20):
        train_step(model, optimizer, *next(batches))
    start = time.perf_counter()
    for _ in range(args.steps):
        train_step(model, optimizer, *next(batches))
    return args.steps * args.batch_size / (time.perf_counter() - start)


def bench_compute(images, labels, args):
    model, optimizer, _ = fresh(images, args)
    model.train()
    n = args.steps * args.batch_size
    order = torch.arange(n) % len(labels)  # as many real images as the other pipelines see
    x, y = images[order], labels[order]
    for b in range(0, 20 * args.batch_size, args.batch_size):
        train_step(model, optimizer, x[b : b + args.batch_size], y[b : b + args.batch_size])
    start = time.perf_counter()
    for b in range(0, n, args.batch_size):
        train_step(model, optimizer, x[b : b + args.batch_size], y[b : b + args.batch_size])
    return n / (time.perf_counter() - start)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=TRAIN_PATH)
    parser.add_argument("--steps", type=int, default=300, help="timed steps per pipeline (default: 300)")
    parser.add_argument("--batch-size", type=int, default=32)
    args = parser.parse_args()
    ensure_data(args.data)
    images, labels = load_pickle(args.data)
    print(f"{args.steps} steps of batch {args.batch_size}, SimpleModel, CPU, {torch.get_num_threads()} threads")
    rate_a = bench_trainer(images, labels, args)
    print(f"(a) trainer loop (tensors, batched augmentation): {rate_a:8.0f} images/s")
    rate_b = bench_naive(images, labels, args)
    print(f"(b) per-sample PIL transforms, DataLoader x2:     {rate_b:8.0f} images/s")
    rate_c = bench_compute(images, labels, args)
    print(f"(c) train step on pre-made batches:               {rate_c:8.0f} images/s")
    print(f"a/b = {rate_a / rate_b:.1f}x (target >= 5)    a/c = {rate_a / rate_c:.2f} (target >= 0.9)")


if __name__ == "__main__":
    run_main(main)
