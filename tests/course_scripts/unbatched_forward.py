"""Course-style: classify one image without a batch dimension, as the course's SimpleModel allows."""
import json
import sys

import torch

from dataset import get_dataset_as_array
from models import SimpleModel

net = SimpleModel()
net.load(sys.argv[2])
net.eval()
image, label = get_dataset_as_array(sys.argv[1])[0]
with torch.no_grad():
    output = net(image)  # [3, 32, 32] in, [1, 3] out
    batched = net(image.unsqueeze(0))
print(json.dumps({"shape": list(output.shape), "same_as_batched": torch.equal(output, batched),
                  "prediction": int(output.argmax(1))}))
