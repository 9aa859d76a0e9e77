"""The main job: train a small CNN on scikit-learn's 8x8 digits with torch.nn.BatchNorm2d and
with custom_bn, from the same seed and initialisation, in Python and in the LibTorch C++
example; print loss and accuracy side by side and plot the loss curves. Then part two
(batch_norm_lessons.py): what batch norm does to the same network."""

import argparse
import copy
import pathlib
import subprocess
import sys
import time

import batch_norm_lessons
import custom_bn
import matplotlib
import torch
from sklearn.datasets import load_digits

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[1]


def say(message):
    print(f"[demo] {message}", flush=True)


def digits_split(seed=0):
    """1797 images of 8x8 pixels, 10 classes; 80% to train, 20% to test."""
    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(digits.target, dtype=torch.long)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    n_train = int(0.8 * len(x))
    train, test = order[:n_train], order[n_train:]
    return {"x_train": x[train], "y_train": y[train], "x_test": x[test], "y_test": y[test]}


def make_net():
    # The same network as examples/train_digits.cpp.
    return torch.nn.Sequential(
        torch.nn.Conv2d(1, 16, 3, padding=1),
        torch.nn.BatchNorm2d(16),
        torch.nn.ReLU(),
        torch.nn.Conv2d(16, 32, 3, padding=1),
        torch.nn.BatchNorm2d(32),
        torch.nn.ReLU(),
        torch.nn.MaxPool2d(2),
        torch.nn.Flatten(),
        torch.nn.Linear(32 * 4 * 4, 10),
    )


def train_python(data, epochs):
    torch.manual_seed(0)
    torch_net = make_net()
    ours_net = custom_bn.convert_batchnorm(copy.deepcopy(torch_net))  # same initialisation
    optimizers = [
        torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9) for net in (torch_net, ours_net)
    ]
    rows = []
    print(
        f"{'Python':15s} {'epoch':>5s}  {'loss torch':>12s} {'loss ours':>12s}  "
        f"{'acc torch':>9s} {'acc ours':>9s}"
    )
    for epoch in range(1, epochs + 1):
        order = torch.randperm(len(data["x_train"]))  # the same batches for both
        theirs = batch_norm_lessons.train_epoch(torch_net, optimizers[0], data, order)
        ours = batch_norm_lessons.train_epoch(ours_net, optimizers[1], data, order)
        rows.append((epoch, theirs[0], ours[0], theirs[1], ours[1]))
        print(
            f"{'Python':15s} {epoch:5d}  {theirs[0]:12.6f} {ours[0]:12.6f}  "
            f"{100 * theirs[1]:8.2f}% {100 * ours[1]:8.2f}%",
            flush=True,
        )
    loss_diff = max(abs(r[1] - r[2]) for r in rows)
    acc_diff = max(abs(r[3] - r[4]) for r in rows)
    print(
        f"{'Python':15s} largest difference: loss {loss_diff:.3g}, accuracy {100 * acc_diff:.3g}%"
    )
    return rows


def train_cpp(binary, data_file, epochs, csv_file):
    subprocess.run([str(binary), str(data_file), str(epochs), str(csv_file)], check=True)
    lines = csv_file.read_text().splitlines()[1:]
    return [tuple(float(v) for v in line.split(",")) for line in lines]


def plot(results, path):
    fig, axes = plt.subplots(1, len(results), figsize=(6 * len(results), 4), squeeze=False)
    for ax, (title, rows) in zip(axes[0], results.items(), strict=False):
        epochs = [r[0] for r in rows]
        ax.plot(epochs, [r[1] for r in rows], "o-", label="torch.nn.BatchNorm2d")
        ax.plot(epochs, [r[2] for r in rows], "x--", label="custom_bn.BatchNorm2d")
        ax.set(
            title=f"{title}: training loss on 8x8 digits",
            xlabel="epoch",
            ylabel="loss",
            yscale="log",
        )
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--lesson-epochs", type=int, default=8)
    parser.add_argument("--build-dir", type=pathlib.Path, default=ROOT / "build")
    parser.add_argument("--out-dir", type=pathlib.Path, default=ROOT / "build" / "demo")
    args = parser.parse_args()
    args.out_dir.mkdir(parents=True, exist_ok=True)

    data = digits_split()
    data_file = args.out_dir / "digits.pt"
    torch.save(data, data_file)
    say(
        f"digits: {len(data['x_train'])} training and {len(data['x_test'])} test images "
        f"(scikit-learn's, saved for the C++ program to {data_file})"
    )

    started = time.time()
    say(f"training in Python through torch.ops.custom_bn ({args.epochs} epochs, twice)")
    results = {"Python": train_python(data, args.epochs)}
    say(f"Python done in {time.time() - started:.1f} s")

    started = time.time()
    say("training in the LibTorch C++ example (examples/train_digits.cpp)")
    results["C++ (LibTorch)"] = train_cpp(
        args.build_dir / "train_digits", data_file, args.epochs, args.out_dir / "cpp_epochs.csv"
    )
    say(f"C++ done in {time.time() - started:.1f} s")

    png = args.out_dir / "loss_curves.png"
    plot(results, png)
    say(f"loss curves written to {png}")

    started = time.time()
    say("part two: what batch norm does (the same data and seed)")
    batch_norm_lessons.run(data, args.lesson_epochs, args.out_dir, say, plt)
    say(f"part two done in {time.time() - started:.1f} s")


if __name__ == "__main__":
    sys.exit(main())
