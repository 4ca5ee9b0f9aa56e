"""Run by tests/test_distributed.py under torchrun: trainer.py, with process 1 reading training data
that differs from process 0's in one label, as two machines with different data/ folders would.

    torchrun --standalone --nproc_per_node=2 tests/distributed_data.py [trainer.py's flags]
"""
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import ddp  # noqa: E402
import trainer  # noqa: E402

load_pickle = trainer.load_pickle


def load_another_copy(path):
    images, labels = load_pickle(path)
    if ddp.rank() == 1 and Path(path).name == "train.pickle":
        labels = labels.clone()
        labels[0] = (labels[0] + 1) % 3
    return images, labels


trainer.load_pickle = load_another_copy
sys.argv[0] = str(ROOT / "trainer.py")  # its error lines read as trainer.py's
ddp.run_main(trainer.main)
