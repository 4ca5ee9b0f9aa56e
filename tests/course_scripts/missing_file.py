"""Course-style: a missing file is caught the way the course's code raises it (FileNotFoundError / OSError)."""
import json

from dataset import get_dataset_as_array, get_dataset_as_torch_dataset
from models import SimpleModel

caught = {}
for name, call in (("get_dataset_as_array", lambda: get_dataset_as_array("no_such/train.pickle")),
                   ("get_dataset_as_torch_dataset", lambda: get_dataset_as_torch_dataset("no_such/dev.pickle"))):
    try:
        call()
    except FileNotFoundError as e:
        caught[name] = str(e)
try:
    SimpleModel().load("no_such/model.ckpt")
except OSError as e:
    caught["load"] = str(e)
print(json.dumps(caught))
