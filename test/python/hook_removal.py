"""Run by test_integrations.py: for each hook point given as "module:attr.attr" (with
"@module" appended where the name is looked up when that module is imported), a forked process
removes the name, imports custom_bn, puts the name back (torch itself still works: the name was
moved, not lost), then shows what still works. Prints {hook point: report} as JSON.

The parent imports torch and compiles the unrelated model once with inductor (in-process, no
worker pool), so that each child's compile finds inductor's code already built and pays only
for tracing."""

import importlib
import json
import os
import sys
import traceback
import warnings

import torch
import torch._inductor.config


def _unrelated_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(5, 5), torch.nn.ReLU())


def _check(spec: str) -> dict:
    hook, _, later_import = spec.partition("@")
    module_name, _, path = hook.partition(":")
    *owner_path, attribute = path.split(".")
    owner = importlib.import_module(module_name)
    for name in owner_path:
        owner = getattr(owner, name)
    removed = getattr(owner, attribute)
    delattr(owner, attribute)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        import custom_bn

        if later_import:
            importlib.import_module(later_import)
    setattr(owner, attribute, removed)
    messages = [str(w.message) for w in caught if str(w.message).startswith("custom_bn:")]

    # The core op and a module, against torch.
    x = torch.randn(4, 3, 5, 5)
    ours, theirs = custom_bn.BatchNorm2d(3), torch.nn.BatchNorm2d(3)
    torch.testing.assert_close(ours(x), theirs(x))
    torch.testing.assert_close(ours.eval()(x), theirs.eval()(x))
    # torch.compile (inductor) of a model without batch norm.
    model = _unrelated_model()
    torch.testing.assert_close(torch.compile(model)(x), model(x))
    return {"warnings": messages, "installed": custom_bn.integrations.status}


def _fork(spec: str) -> tuple[int, int]:
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(read)
        try:
            report = _check(spec)
        except BaseException:  # noqa: BLE001  reported to the parent, which the test reads
            report = {"error": traceback.format_exc()}
        with os.fdopen(write, "w") as out:
            json.dump(report, out)
        os._exit(0)
    os.close(write)
    return pid, read


def main(specs: list[str], at_once: int = 2) -> dict:
    reports, pending = {}, list(specs)
    running: dict[int, tuple[str, int]] = {}
    while pending or running:
        while pending and len(running) < at_once:
            spec = pending.pop(0)
            pid, read = _fork(spec)
            running[pid] = (spec, read)
        pid, status = os.wait()
        spec, read = running.pop(pid)
        with os.fdopen(read) as source:
            text = source.read()
        code = os.waitstatus_to_exitcode(status)
        reports[spec] = json.loads(text) if text else {"error": f"exit status {code}"}
    return reports


if __name__ == "__main__":
    torch._inductor.config.compile_threads = 1
    torch.compile(_unrelated_model())(torch.randn(4, 3, 5, 5))
    print(json.dumps(main(sys.argv[1:])))
