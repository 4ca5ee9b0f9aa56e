"""Course-style: data saved with numpy labels, numpy images and batched [1, 3, 32, 32] images, loaded back."""
import json
import pickle
import sys

import numpy as np
import torch

from dataset import get_dataset_as_array

items = get_dataset_as_array(sys.argv[1])[:12]
variants = {
    "numpy int64 labels": [(image, np.int64(label)) for image, label in items],
    "one-element label tensors": [(image, torch.tensor([label])) for image, label in items],
    "numpy images": [(image.numpy(), label) for image, label in items],
    "batch-of-one images": [(image.unsqueeze(0), label) for image, label in items],
}
results = {}
for name, data in variants.items():
    with open(sys.argv[2], "wb") as f:
        pickle.dump(data, f)
    loaded = get_dataset_as_array(sys.argv[2])
    results[name] = all(type(label) is int and label == want and image.shape == (3, 32, 32) and torch.equal(image, img)
                        for (image, label), (img, want) in zip(loaded, items))
print(json.dumps(results))
