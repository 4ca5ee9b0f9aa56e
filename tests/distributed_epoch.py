"""Run by tests/test_distributed.py under torchrun: what each process trains on in one epoch of trainer.run_epoch.

    torchrun --standalone --nproc_per_node=2 tests/distributed_epoch.py OUT.json

Every image holds its own index as pixel value and augmentation is off, so a model that
records its inputs sees which images its process trained on at every step. Rank 0 writes
them all to OUT.json, with the epoch's order drawn as one process draws it, and what
ddp.spread dealt out and gathered.
"""
import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import ddp  # noqa: E402
import trainer  # noqa: E402


class Recorder(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = torch.nn.Linear(1, 3)
        self.seen = []

    def forward(self, x):
        self.seen.append(x[:, 0, 0, 0].round().long().tolist())
        return self.linear(x[:, :1, 0, 0])


def main():
    device = ddp.setup("cpu")
    labels = torch.cat([torch.zeros(70), torch.ones(11), torch.full((20,), 2)]).long()
    images = torch.arange(len(labels)).float()[:, None, None, None].expand(-1, 3, 32, 32).contiguous()
    args = trainer.parse_args(["--no-augment", "--fix-labels", "none", "--batch-size", "7", "--epochs", "1"])
    model = Recorder()
    optimizer, scheduler = trainer.make_optimizer(model, args, 100)
    trainer.run_epoch(ddp.wrap(model, device), optimizer, scheduler, images, labels, args,
                      trainer.seeded(args.seed, "main", 1), device)
    seen = [None] * ddp.size()
    dist.all_gather_object(seen, model.seen)
    dealt = ddp.spread(lambda k: (k, ddp.rank()), range(5))
    if ddp.is_main():
        order = trainer.epoch_indices(labels, "balanced", trainer.seeded(args.seed, "main", 1))
        Path(sys.argv[1]).write_text(json.dumps({"order": order.tolist(), "batch_size": args.batch_size,
                                                 "seen": seen, "dealt": dealt}))


if __name__ == "__main__":
    ddp.run_main(main)
