"""Course-style: clean the data, pickle the MyDataset object itself, load it back with the course's function.

Two MyDataset classes are pickled: dataset.py's own, and one defined here (as students do).
"""
import json
import pickle
import sys

import torch
from torch.utils.data import Dataset

import dataset
from dataset import get_dataset_as_array, get_dataset_as_torch_dataset


class MyDataset(Dataset):  # a student's own class of the course's name, pickled as __main__.MyDataset
    def __init__(self, the_list, transform=None):
        self.the_list = the_list
        self.transform = transform

    def __len__(self):
        return len(self.the_list)

    def __getitem__(self, idx):
        return self.the_list[idx]


train, out = sys.argv[1], sys.argv[2]
items = get_dataset_as_array(train)
cleaned = [(image, 2 if i % 7 == 0 else label) for i, (image, label) in enumerate(items)]  # "fixed" labels
results = {}
for name, cls in (("course", dataset.MyDataset), ("own", MyDataset)):
    with open(out, "wb") as f:
        pickle.dump(cls(cleaned), f)
    loaded = get_dataset_as_torch_dataset(out)
    results[name] = len(loaded) == len(cleaned) and all(
        torch.equal(a[0], b[0]) and a[1] == b[1] for a, b in zip(loaded, cleaned))
print(json.dumps(results))
