"""torch.func over the ops and the modules: grad, vjp, jacrev, jvp, jacfwd, hessian, forward-mode
AD, vmap, per-sample gradients and stack_module_state ensembles. Each transform is checked
against a loop over the same calls in eager autograd, and against torch's batch norm wherever
torch supports the call. Where torch refuses (a transform over training-mode batch norm that
updates running stats), ours works and updates them once per call."""

import copy

import custom_bn
import pytest
import torch
from torch.func import (
    functional_call,
    grad,
    hessian,
    jacfwd,
    jacrev,
    jvp,
    stack_module_state,
    vjp,
    vmap,
)

ops = torch.ops.custom_bn
EPS = 1e-5


def inputs(shape=(4, 3, 5), seed_shift=0.5):
    x = torch.randn(shape, dtype=torch.float64) * 2 + seed_shift
    w = torch.rand(shape[1], dtype=torch.float64) + 0.5
    b = torch.randn(shape[1], dtype=torch.float64)
    return x, w, b


def ours(training, stats=None, relu=False, residual=None):
    """batch_norm (or batch_norm_relu) of (x, w, b) with fixed running stats."""
    rm, rv = stats if stats is not None else (None, None)

    def f(x, w, b):
        if relu:
            return ops.batch_norm_relu(x, w, b, rm, rv, training, 0.1, EPS, None, residual)
        return ops.batch_norm(x, w, b, rm, rv, training, 0.1, EPS)

    return f


def theirs(training, stats=None, relu=False, residual=None):
    rm, rv = stats if stats is not None else (None, None)

    def f(x, w, b):
        y = torch.batch_norm(x, w, b, rm, rv, training, 0.1, EPS, False)
        if relu:
            y = (y if residual is None else y + residual).relu()
        return y

    return f


def loss(f):
    return lambda x, w, b: f(x, w, b).square().sum()


def eval_stats(channels=3):
    return (torch.randn(channels, dtype=torch.float64),
            torch.rand(channels, dtype=torch.float64) + 0.5)  # fmt: skip


MODES = {
    "train": dict(training=True),
    "eval": dict(training=False, stats=eval_stats()),
    "relu-train": dict(training=True, relu=True),
    "relu-eval": dict(training=False, stats=eval_stats(), relu=True),
}


def assert_all_close(actual, expected):
    for a, e in zip(actual, expected, strict=True):
        torch.testing.assert_close(a, e)


@pytest.mark.parametrize("mode", MODES)
def test_reverse_mode_transforms_match_torch(mode):
    x, w, b = inputs()
    f, g = ours(**MODES[mode]), theirs(**MODES[mode])
    assert_all_close(grad(loss(f), argnums=(0, 1, 2))(x, w, b),
                     grad(loss(g), argnums=(0, 1, 2))(x, w, b))  # fmt: skip
    out, pullback = vjp(f, x, w, b)
    expected_out, expected_pullback = vjp(g, x, w, b)
    cotangent = torch.randn_like(out)
    torch.testing.assert_close(out, expected_out)
    assert_all_close(pullback(cotangent), expected_pullback(cotangent))
    assert_all_close(jacrev(f, argnums=(0, 1, 2))(x, w, b),
                     jacrev(g, argnums=(0, 1, 2))(x, w, b))  # fmt: skip


@pytest.mark.parametrize("mode", MODES)
def test_forward_mode_transforms_match_torch(mode):
    x, w, b = inputs()
    f, g = ours(**MODES[mode]), theirs(**MODES[mode])
    tangents = (torch.randn_like(x), torch.randn_like(w), torch.randn_like(b))
    assert_all_close(jvp(f, (x, w, b), tangents), jvp(g, (x, w, b), tangents))
    assert_all_close(jacfwd(f, argnums=(0, 1, 2))(x, w, b),
                     jacfwd(g, argnums=(0, 1, 2))(x, w, b))  # fmt: skip
    # Second order, forward over reverse.
    torch.testing.assert_close(hessian(loss(f))(x, w, b), hessian(loss(g))(x, w, b))


def test_forward_ad_dual_tensors_match_torch():
    import torch.autograd.forward_ad as fwAD

    x, w, b = inputs((3, 4, 2, 2))
    tangent = torch.randn_like(x)
    results = []
    for f in (ours(True), theirs(True)):
        with fwAD.dual_level():
            y = f(fwAD.make_dual(x, tangent), w, b)
            results.append(fwAD.unpack_dual(y).tangent)
    torch.testing.assert_close(results[0], results[1])


def test_fused_residual_gradients_and_tangents_match_the_composition():
    x, w, b = inputs((4, 3, 2, 3))
    residual = torch.randn_like(x)
    f = lambda x, r: ops.batch_norm_relu(x, w, b, None, None, True, 0.1, EPS, None, r)  # noqa: E731
    g = lambda x, r: (torch.batch_norm(x, w, b, None, None, True, 0.1, EPS, False) + r).relu()  # noqa: E731
    assert_all_close(jacrev(f, argnums=(0, 1))(x, residual),
                     jacrev(g, argnums=(0, 1))(x, residual))  # fmt: skip
    tangents = (torch.randn_like(x), torch.randn_like(x))
    assert_all_close(jvp(f, (x, residual), tangents), jvp(g, (x, residual), tangents))


@pytest.mark.parametrize("momentum", [0.1, None])
def test_grad_over_training_with_running_stats_updates_them_once(momentum):
    """torch refuses this (the module's in-place num_batches_tracked update on a captured
    buffer, pytorch issue 85533); the op does its bookkeeping inside, so it runs, with eager
    autograd's gradients and exactly one update of the running stats."""
    x, w, b = inputs((6, 3, 4))
    state = [torch.zeros(3, dtype=torch.float64), torch.ones(3, dtype=torch.float64),
             torch.tensor(2)]  # fmt: skip
    eager_state = [t.clone() for t in state]

    def step(x, w, b, state):
        return ops.batch_norm(x, w, b, *state[:2], True, momentum, EPS, state[2]).square().sum()

    grads = grad(step, argnums=(0, 1, 2))(x, w, b, state)
    leaves = [t.clone().requires_grad_() for t in (x, w, b)]
    expected = torch.autograd.grad(step(*leaves, eager_state), leaves)
    assert_all_close(grads, expected)
    assert_all_close(state, eager_state)
    assert state[2].item() == 3


def eager_reference(models, xs):
    return torch.stack([m(x) for m, x in zip(models, xs, strict=True)])


@pytest.mark.parametrize("mode", ["eval", "train-without-stats"])
def test_vmap_of_the_op_matches_a_loop_and_torch(mode):
    xs = torch.randn(5, 4, 3, 6, dtype=torch.float64)
    w = torch.rand(3, dtype=torch.float64) + 0.5
    stats = eval_stats() if mode == "eval" else (None, None)
    training = mode != "eval"
    f = lambda x: ops.batch_norm(x, w, None, *stats, training, 0.1, EPS)  # noqa: E731
    g = lambda x: torch.batch_norm(x, w, None, *stats, training, 0.1, EPS, False)  # noqa: E731
    batched = vmap(f)(xs)
    torch.testing.assert_close(batched, torch.stack([f(x) for x in xs]))
    torch.testing.assert_close(batched, vmap(g)(xs))
    # A vmapped dimension elsewhere, and batched parameters.
    ws = torch.rand(5, 3, dtype=torch.float64) + 0.5
    h = lambda x, w: ops.batch_norm(x, w, None, *stats, training, 0.1, EPS)  # noqa: E731
    moved = vmap(h, in_dims=(2, 0))(xs.movedim(0, 2), ws)
    torch.testing.assert_close(moved, torch.stack([h(x, w) for x, w in zip(xs, ws, strict=True)]))


@pytest.mark.parametrize("momentum", [0.1, None])
@pytest.mark.parametrize("cls", [custom_bn.BatchNorm1d, custom_bn.BatchNormReLU2d])
def test_stack_module_state_ensembles_update_each_models_running_stats(momentum, cls):
    """Training an ensemble with vmap: each model's running stats are updated by its own batch,
    as the same models called one by one update theirs."""
    count = 3
    models = [cls(4, momentum=momentum).double() for _ in range(count)]
    for m in models:
        m.weight.data.uniform_(0.5, 1.5)
        m.bias.data.normal_()
    looped = copy.deepcopy(models)
    shape = (count, 5, 4, 3) if cls is custom_bn.BatchNorm1d else (count, 5, 4, 3, 2)
    xs = torch.randn(shape, dtype=torch.float64)
    params, buffers = stack_module_state(models)
    base = copy.deepcopy(models[0]).to("meta")
    for _ in range(2):
        out = vmap(lambda p, b, x: functional_call(base, (p, b), (x,)))(params, buffers, xs)
        torch.testing.assert_close(out, eager_reference(looped, xs))
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        torch.testing.assert_close(buffers[name], torch.stack([getattr(m, name) for m in looped]))


def test_unbatched_running_stats_under_a_batched_training_call_are_an_error():
    xs = torch.randn(3, 4, 2, dtype=torch.float64)
    rm, rv = torch.zeros(2, dtype=torch.float64), torch.ones(2, dtype=torch.float64)
    with pytest.raises(RuntimeError, match="running_mean and running_var once per batch element"):
        vmap(lambda x: ops.batch_norm(x, None, None, rm, rv, True, 0.1, EPS))(xs)
    assert torch.equal(rm, torch.zeros(2, dtype=torch.float64))


def test_per_sample_gradients_match_a_loop_and_torch():
    """vmap(grad(...)) over samples, each a batch of its own: the per-sample gradients of a
    conv + batch norm (training, batch statistics) model."""

    def model_of(bn):
        torch.manual_seed(0)
        return torch.nn.Sequential(torch.nn.Conv2d(2, 3, 3), bn, torch.nn.ReLU()).double()

    ours_model = model_of(custom_bn.BatchNorm2d(3, track_running_stats=False))
    torch_model = model_of(torch.nn.BatchNorm2d(3, track_running_stats=False))
    xs = torch.randn(6, 2, 6, 6, dtype=torch.float64)

    def per_sample(model):
        params = {k: v.detach() for k, v in model.named_parameters()}

        def sample_loss(p, x):
            return functional_call(model, p, (x.unsqueeze(0),)).square().sum()

        return vmap(grad(sample_loss), in_dims=(None, 0))(params, xs), params, sample_loss

    grads, params, sample_loss = per_sample(ours_model)
    torch_grads, _, _ = per_sample(torch_model)
    for name in grads:
        looped = torch.stack([grad(sample_loss)(params, x)[name] for x in xs])
        torch.testing.assert_close(grads[name], looped)
        torch.testing.assert_close(grads[name], torch_grads[name])


def test_module_transforms_through_functional_call():
    model = custom_bn.BatchNorm2d(3).double().eval()
    model.running_mean.normal_()
    reference = torch.nn.BatchNorm2d(3).double().eval()
    reference.load_state_dict(model.state_dict())
    x = torch.randn(2, 3, 4, 4, dtype=torch.float64)
    params = {k: v.detach() for k, v in model.named_parameters()}

    def loss_of(m):
        return lambda p, x: functional_call(m, p, (x,)).square().sum()

    assert_all_close(grad(loss_of(model), argnums=(0, 1))(params, x),
                     grad(loss_of(reference), argnums=(0, 1))(params, x))  # fmt: skip
