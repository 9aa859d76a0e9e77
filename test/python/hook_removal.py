"""Run by test_integrations.py in a fresh process: removes one torch name an integration hooks
into (argv[1], "module:attr.attr"), imports custom_bn, puts the name back (torch itself still
works: it was moved, not lost), then shows what still works. Prints a JSON report."""

import importlib
import json
import sys
import warnings

import torch

module_name, _, path = sys.argv[1].partition(":")
*owner_path, attribute = path.split(".")
owner = importlib.import_module(module_name)
for name in owner_path:
    owner = getattr(owner, name)
removed = getattr(owner, attribute)
delattr(owner, attribute)
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    import custom_bn

    if len(sys.argv) > 2:  # a module whose import runs a deferred installation
        importlib.import_module(sys.argv[2])
setattr(owner, attribute, removed)
messages = [str(w.message) for w in caught if str(w.message).startswith("custom_bn:")]

# The core op and a module, against torch.
x = torch.randn(4, 3, 5, 5)
ours, theirs = custom_bn.BatchNorm2d(3), torch.nn.BatchNorm2d(3)
torch.testing.assert_close(ours(x), theirs(x))
torch.testing.assert_close(ours.eval()(x), theirs.eval()(x))
# torch.compile (inductor) of a model without batch norm.
model = torch.nn.Sequential(torch.nn.Linear(5, 5), torch.nn.ReLU())
torch.testing.assert_close(torch.compile(model)(x), model(x))
print(json.dumps({"warnings": messages, "installed": custom_bn.integrations.status}))
