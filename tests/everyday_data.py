"""The ways people write course data: for each, what pickle.dump is given for (images, labels) in
the course format, and the protocol. tests/test_everyday_files.py loads them; bench/untrusted_budgets.py
measures what they use of the restricted readers' limits."""
import numpy as np
import torch
from torch.utils.data import DataLoader

import dataset


def dataloader_views(images, labels):
    """What a student's cleaning loop keeps: DataLoader(batch_size=1) batches, (x[0], y[0]) each a
    view of a storage of its own, the label a 0-d tensor."""
    return [(x[0], y[0]) for x, y in DataLoader(dataset.MyDataset(dataset.as_course_list(images, labels)), batch_size=1)]


def sliced_copies(images, labels):
    """Items sliced from two big tensors, copied (a pickled view writes its whole storage again)."""
    return [(images[i].clone(), labels[i].clone()) for i in range(len(labels))]


def tensor_labels(images, labels):
    return [(image, torch.tensor(int(label))) for image, label in dataset.as_course_list(images, labels)]


def numpy_items(images, labels):
    return [(image.numpy(), np.int64(label)) for image, label in dataset.as_course_list(images, labels)]


def float64_images(images, labels):
    return [(image.double(), int(label)) for image, label in zip(images, labels)]


# name -> (make(images, labels), pickle protocol)
WRITERS = {
    "DataLoader views in a MyDataset": (lambda x, y: dataset.MyDataset(dataloader_views(x, y)), 4),
    "DataLoader views in a list": (dataloader_views, 4),
    **{f"DataLoader views, protocol {p}": (dataloader_views, p) for p in (0, 1, 2, 3, 5)},
    "items sliced from two big tensors, copied": (sliced_copies, 4),
    "labels made with torch.tensor(y)": (tensor_labels, 4),
    "numpy images and numpy labels": (numpy_items, 4),
    "numpy images and labels, protocol 0": (numpy_items, 0),
    "float64 images": (float64_images, 4),
}
