"""Course-style: everything through `from dataset import *`, then numpy as the course's module provides it."""
import json
import sys

from dataset import *  # noqa: F403
from models import *  # noqa: F403

data = get_dataset_as_array(sys.argv[1])  # noqa: F405
labels = np.array([label for _, label in data])  # noqa: F405
images = torch.stack([image for image, _ in data])  # noqa: F405
print(json.dumps({"counts": np.bincount(labels, minlength=3).tolist(), "mean": float(np.mean(labels)),  # noqa: F405
                  "pixels": float(images.mean()), "dataset_class": issubclass(MyDataset, Dataset),  # noqa: F405
                  "pickle": pickle.HIGHEST_PROTOCOL}))  # noqa: F405
