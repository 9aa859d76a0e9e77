"""The second part of the demo: what batch norm does, shown on the same digits and seed.

1. The same network without batch norm, with custom_bn before each ReLU (the fused
   BatchNormReLU2d) and with custom_bn after each ReLU, trained at the usual learning rate and
   at a small one, where the network without batch norm learns slowly.
2. For the first batch-norm layer: the learned scale (gamma) and shift (beta) per channel, and
   how far they moved from 1 and 0; the running mean and variance against the statistics of
   the whole training set at that layer.
3. Eval mode normalizes with the running statistics, so an image's output does not depend on
   the rest of its batch; training mode normalizes with the batch's, so it does.
"""

import copy

import custom_bn
import torch
import torch.nn.functional as F

# The parity part's rate, and a tenth of it, where the network without batch norm barely
# moves in the first epochs. (Rates far above the usual one fail for all three here: the
# classifier at the end is not normalized.)
LEARNING_RATES = {"usual": 0.05, "small": 0.005}
MODELS = ("no batch norm", "BN before ReLU (fused)", "BN after ReLU")


def make_net(kind):
    """The parity part's network (Conv, BN, ReLU twice, then a linear classifier), with batch
    norm removed, fused before the ReLU, or moved after it."""

    def block(cin, cout):
        conv = torch.nn.Conv2d(cin, cout, 3, padding=1)
        if kind == "no batch norm":
            return [conv, torch.nn.ReLU()]
        if kind == "BN before ReLU (fused)":
            return [conv, custom_bn.BatchNormReLU2d(cout)]
        return [conv, torch.nn.ReLU(), custom_bn.BatchNorm2d(cout)]

    return torch.nn.Sequential(
        *block(1, 16), *block(16, 32), torch.nn.MaxPool2d(2), torch.nn.Flatten(),
        torch.nn.Linear(32 * 4 * 4, 10),
    )  # fmt: skip


def train_epoch(net, optimizer, data, order, batch_size=64):
    """One epoch over the training images in `order`; (mean training loss, test accuracy).
    The parity part trains with it too."""
    net.train()
    losses = []
    for start in range(0, len(order), batch_size):
        index = order[start : start + batch_size]
        optimizer.zero_grad()
        loss = F.cross_entropy(net(data["x_train"][index]), data["y_train"][index])
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    net.eval()
    with torch.no_grad():
        accuracy = (net(data["x_test"]).argmax(1) == data["y_test"]).double().mean().item()
    return sum(losses) / len(losses), accuracy


def train(kind, lr, data, epochs):
    """Per-epoch (mean training loss, test accuracy); the trained network."""
    torch.manual_seed(0)
    net = make_net(kind)
    optimizer = torch.optim.SGD(net.parameters(), lr=lr, momentum=0.9)
    history = [
        train_epoch(net, optimizer, data, torch.randperm(len(data["x_train"])))
        for _ in range(epochs)
    ]
    return history, net


def print_histories(label, histories):
    header = "".join(f" | {kind:>24s}" for kind in histories)
    print(f"lr {label:6s} epoch{header}")
    epochs = len(next(iter(histories.values())))
    for epoch in range(epochs):
        cells = "".join(
            f" | loss {h[epoch][0]:8.4f} acc {100 * h[epoch][1]:5.1f}%" for h in histories.values()
        )
        print(f"{'':9s} {epoch + 1:5d}{cells}")


def first_batch_norm(net):
    fused_or_not = (custom_bn.BatchNorm2d, custom_bn.BatchNormReLU2d)
    return next(m for m in net.modules() if isinstance(m, fused_or_not))


def layer_input(net, bn, x):
    """What the batch-norm layer `bn` receives when net runs on x (in eval mode)."""
    captured = []
    handle = bn.register_forward_hook(lambda module, inputs, output: captured.append(inputs[0]))
    with torch.no_grad():
        net.eval()(x)
    handle.remove()
    return captured[0]


def explain_parameters(net, data, say):
    bn = first_batch_norm(net)
    gamma, beta = bn.weight.detach(), bn.bias.detach()
    say("the first batch-norm layer of the fused network (usual learning rate), per channel:")
    print("  gamma " + " ".join(f"{v:5.2f}" for v in gamma.tolist()))
    print("  beta  " + " ".join(f"{v:5.2f}" for v in beta.tolist()))
    print(
        f"  gamma moved from 1 by {(gamma - 1).abs().mean():.3f} on average "
        f"(at most {(gamma - 1).abs().max():.3f}); beta from 0 by {beta.abs().mean():.3f} "
        f"(at most {beta.abs().max():.3f}): the layer learned its own scale and shift"
    )
    values = layer_input(net, bn, data["x_train"]).transpose(0, 1).reshape(bn.num_features, -1)
    mean, var = values.mean(1), values.var(1)
    print(
        "  running mean vs the whole training set's mean at this layer: largest difference "
        f"{(bn.running_mean - mean).abs().max():.4f} (means span {mean.min():.3f} to "
        f"{mean.max():.3f})"
    )
    print(
        "  running var vs the whole training set's variance: largest relative difference "
        f"{((bn.running_var - var).abs() / var).max():.1%}: a moving average of the batches'"
    )


def explain_modes(net, data, say):
    """The first batch-norm layer's output for one image's features, in two different batches,
    in eval and in training mode."""
    bn = copy.deepcopy(first_batch_norm(net))  # training mode would move the running stats
    features = layer_input(net, first_batch_norm(net), data["x_train"][:68])
    image = features[:1]
    batches = (torch.cat([image, features[1:64]]), torch.cat([image, features[64:67]]))
    differences = {}
    for mode in ("eval", "train"):
        bn.train(mode == "train")
        with torch.no_grad():
            outputs = [bn(batch)[0] for batch in batches]
        differences[mode] = (outputs[0] - outputs[1]).abs().max().item()
    say("one image's features normalized within two different batches (64 and 4 images):")
    print(
        f"  eval mode:     largest difference {differences['eval']:.2e}: normalized with the "
        "running statistics, the rest of the batch does not matter"
    )
    print(
        f"  training mode: largest difference {differences['train']:.2e}: normalized with each "
        "batch's own statistics, so the output depends on the other images"
    )


def plot(results, path, plt):
    """Training loss (top) and test accuracy (bottom) per epoch, one column per rate."""
    fig, axes = plt.subplots(2, len(results), figsize=(6 * len(results), 7), squeeze=False)
    for column, (label, histories) in enumerate(results.items()):
        for kind, history in histories.items():
            epochs = range(1, len(history) + 1)
            axes[0][column].plot(epochs, [loss for loss, _ in history], "o-", label=kind)
            axes[1][column].plot(epochs, [100 * acc for _, acc in history], "o-", label=kind)
        axes[0][column].set(title=f"lr {LEARNING_RATES[label]} ({label})",
                            ylabel="training loss", yscale="log")  # fmt: skip
        axes[1][column].set(xlabel="epoch", ylabel="test accuracy (%)")
        axes[0][column].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def run(data, epochs, out_dir, say, plt):
    results, fused_net = {}, None
    for label, lr in LEARNING_RATES.items():
        histories = {}
        for kind in MODELS:
            say(f"training '{kind}' at lr {lr} ({epochs} epochs)")
            histories[kind], net = train(kind, lr, data, epochs)
            if label == "usual" and kind == "BN before ReLU (fused)":
                fused_net = net
        results[label] = histories
        print_histories(f"{lr}", histories)
    explain_parameters(fused_net, data, say)
    explain_modes(fused_net, data, say)
    png = out_dir / "batch_norm_lessons.png"
    plot(results, png, plt)
    say(f"training curves of the three networks written to {png}")
