"""Course-style code, written the way the course's own tester and trainer are: it knows only
the course's module API (models.SimpleModel with save/load, dataset.get_dataset_as_torch_dataset,
MyDataset, label_names) and plain torch. tests/test_course_dropin.py runs it against this
project's models.py and dataset.py and compares its numbers with tester.py's.

    python tests/course_code.py TRAIN_PICKLE DEV_PICKLE PRETRAINED_CKPT OUT_CKPT
"""
import json
import sys

import torch
import torch.nn as nn
import torch.optim as optim
from torch.utils.data import DataLoader, WeightedRandomSampler

from dataset import MyDataset, get_dataset_as_array, get_dataset_as_torch_dataset, label_names
from models import SimpleModel


def evaluate(net, path):
    dataset = get_dataset_as_torch_dataset(path)
    loader = DataLoader(dataset, batch_size=64, shuffle=False)
    names = label_names()
    correct = {name: 0 for name in names.values()}
    total = {name: 0 for name in names.values()}
    net.eval()
    with torch.no_grad():
        for images, labels in loader:
            outputs = net(images)
            _, predicted = torch.max(outputs, 1)
            for label, prediction in zip(labels, predicted):
                total[names[label.item()]] += 1
                if label == prediction:
                    correct[names[label.item()]] += 1
    per_class = {name: correct[name] / total[name] for name in names.values()}
    return {"per_class": per_class, "balanced": sum(per_class.values()) / len(per_class),
            "accuracy": sum(correct.values()) / sum(total.values())}


def train_one_epoch(path, out):
    torch.manual_seed(0)
    the_list = get_dataset_as_array(path)
    train_set = MyDataset(the_list)
    labels = [label for _, label in the_list]
    counts = [labels.count(c) for c in range(len(label_names()))]
    weights = [1.0 / counts[label] for label in labels]
    sampler = WeightedRandomSampler(weights, num_samples=len(weights), replacement=True)
    loader = DataLoader(train_set, batch_size=32, sampler=sampler)
    net = SimpleModel()
    criterion = nn.CrossEntropyLoss()
    optimizer = optim.Adam(net.parameters(), lr=1e-3)
    net.train()
    for images, labels in loader:
        optimizer.zero_grad()
        loss = criterion(net(images), labels)
        loss.backward()
        optimizer.step()
    net.save(out)


def main():
    train_path, dev_path, pretrained, out = sys.argv[1:5]
    net = SimpleModel()
    net.load(pretrained)
    results = {"pretrained": evaluate(net, dev_path)}
    train_one_epoch(train_path, out)
    trained = SimpleModel()
    trained.load(out)
    results["trained"] = evaluate(trained, dev_path)
    print(json.dumps(results))


if __name__ == "__main__":
    main()
