"""The factored rules of order 1 piece by piece: each layer at ``theta + s D`` from the factors of
``D`` must equal the layer evaluated with the update formed by autograd (float64, independent of
the rules' own algebra), whichever way (Gram of patches, Gram of pixels, formed update) a rule
takes; and the choice ``batch_mode="auto"`` makes between the factored passes and the loop."""

from __future__ import annotations

import itertools

import pytest
import torch
from torch import nn

import captum_normgrad._order1.plan as plan
from captum_normgrad import LayerNormGradOrder1
from captum_normgrad._order1.autograd import ForwardCaller
from captum_normgrad._order1.factored.rules import rule_for
from captum_normgrad._order1.factored.rules.base import Factors
from captum_normgrad._order1.plan import layer_bytes_per_example


def _per_example_update(module: nn.Module, inputs: torch.Tensor, grads: torch.Tensor) -> list:
    """Each example's gradient of the module's parameters, by autograd on that example alone."""
    updates = []
    for x, g in zip(inputs, grads):
        out = module(x.unsqueeze(0))
        params = [p for p in module.parameters() if p.requires_grad]
        updates.append(torch.autograd.grad(out, params, g.unsqueeze(0)))
    return updates


def _moved_output(module: nn.Module, x: torch.Tensor, update: tuple, scale: float) -> torch.Tensor:
    params = [p for p in module.parameters() if p.requires_grad]
    originals = [p.detach().clone() for p in params]
    with torch.no_grad():
        for p, d in zip(params, update):
            p.add_(scale * d)
        out = module(x.unsqueeze(0))
        for p, o in zip(params, originals):
            p.copy_(o)
    return out[0]


def _check_rule(
    module: nn.Module, inputs: torch.Tensor, new_inputs: torch.Tensor, route: str | None = None
) -> None:
    """``route``: force a convolution's ``"gram"`` or ``"formed"`` route (default: its choice)."""
    module = module.double()
    inputs, new_inputs = inputs.double(), new_inputs.double()
    with torch.no_grad():
        grads = torch.randn_like(module(inputs))
    factors = Factors(inputs, grads)
    scale = torch.tensor([0.3, -1.7, 2.0][: inputs.shape[0]], dtype=torch.float64)
    rule = rule_for(module)
    if route is not None:
        rule._strategy = lambda factors: (route == "gram", False)
    with torch.no_grad():
        shared = module(new_inputs)
        if rule.replaces(factors):
            got = rule.output_at(new_inputs, factors, scale)
        else:
            got = shared + rule.correction(new_inputs, shared.shape, factors, scale)
        norms = rule.squared_norm(factors)
        # Unscaled, the change is what the exact product pairs with a second pass's output
        # gradient: <g, c> = <G_i, D_i> for that pass's gradient G.
        change = rule.correction(new_inputs, shared.shape, factors).expand(shared.shape)
    new_grads = torch.randn_like(shared)
    paired_by_change = (new_grads * change).flatten(1).sum(dim=1)
    updates = _per_example_update(module, inputs, grads)
    new_updates = _per_example_update(module, new_inputs, new_grads)
    for i, update in enumerate(updates):
        expected = _moved_output(module, new_inputs[i], update, float(scale[i]))
        torch.testing.assert_close(got[i], expected, rtol=1e-10, atol=1e-10)
        unscaled = _moved_output(module, new_inputs[i], update, 1.0) - shared[i]
        torch.testing.assert_close(change[i], unscaled, rtol=1e-10, atol=1e-10)
        squared = sum(d.square().sum() for d in update)
        torch.testing.assert_close(norms[i], squared, rtol=1e-10, atol=1e-12)
        paired = sum((d * e).sum() for d, e in zip(update, new_updates[i]))
        torch.testing.assert_close(paired_by_change[i], paired, rtol=1e-10, atol=1e-12)
    if rule.rewrites_for_double_backward:
        # The same layer, and its derivatives to second order, by finite differences.
        with torch.no_grad():
            torch.testing.assert_close(
                rule.twice_differentiable_output(new_inputs), shared, rtol=1e-12, atol=1e-12
            )
        probe = (
            new_inputs[:1, :, :6, :6].clone().requires_grad_()
            if new_inputs.dim() == 4
            else new_inputs[:1].clone().requires_grad_()
        )
        assert torch.autograd.gradgradcheck(rule.twice_differentiable_output, (probe,))


@pytest.mark.parametrize(
    "kernel, stride, padding, dilation, groups, bias",
    [
        (k, s, p, d, g, b)
        for k, s, p, d, g, b in itertools.product(
            (1, 3, (2, 3)), (1, 2), (0, 1), (1, 2), (1, 2), (True, False)
        )
        if not (isinstance(k, tuple) and d == 2 and p == 0)
    ],
)
def test_conv2d_rule_equals_the_layer_at_the_formed_update(
    kernel, stride, padding, dilation, groups, bias
):
    torch.manual_seed(0)
    conv = nn.Conv2d(
        4, 6, kernel, stride=stride, padding=padding, dilation=dilation, groups=groups, bias=bias
    )
    _check_rule(conv, torch.randn(3, 4, 9, 8), torch.randn(3, 4, 9, 8))


@pytest.mark.parametrize("channels, size", [(64, 4), (2, 24)])
def test_conv_rule_takes_each_route_and_each_gives_the_same_layer(channels, size):
    """Many channels on a small image: Gram (of pixels for a 3x3 kernel); few channels on a large
    one: the formed update, grouped by example. Both against autograd's update."""
    torch.manual_seed(1)
    conv = nn.Conv2d(channels, channels, 3, padding=1)
    inputs = torch.randn(2, channels, size, size)
    factors = Factors(inputs.double(), torch.randn(2, channels, size, size).double())
    uses_gram, from_pixels = rule_for(conv.double())._strategy(factors)
    assert uses_gram == (size == 4)
    assert from_pixels or not uses_gram
    _check_rule(conv, inputs, torch.randn_like(inputs))


def test_pixel_gram_equals_patch_gram_for_every_geometry():
    torch.manual_seed(2)
    for kernel, stride, padding, dilation, groups, one_d in itertools.product(
        (1, 3, (2, 3)), (1, 2), (0, 1, 2), (1, 2), (1, 2), (False, True)
    ):
        if one_d and isinstance(kernel, tuple):
            continue
        layer = (nn.Conv1d if one_d else nn.Conv2d)(
            4, 6, kernel, stride=stride, padding=padding, dilation=dilation, groups=groups
        ).double()
        shape = (3, 4, 9) if one_d else (3, 4, 9, 8)
        old, new = torch.randn(shape).double(), torch.randn(shape).double()
        try:
            layer(old)
        except RuntimeError:  # kernel larger than the padded input
            continue
        rule = rule_for(layer)
        by_patches = torch.bmm(rule._patches(new), rule._patches(old).transpose(1, 2))
        torch.testing.assert_close(
            rule._pixel_gram_matrix(new, old), by_patches, rtol=1e-12, atol=1e-12
        )


@pytest.mark.parametrize("tokens", [None, 5])
def test_linear_rule_on_features_and_on_tokens(tokens):
    torch.manual_seed(3)
    shape = (3, 7) if tokens is None else (3, tokens, 7)
    _check_rule(nn.Linear(7, 4), torch.randn(shape), torch.randn(shape))


def test_conv1d_rule():
    torch.manual_seed(4)
    _check_rule(
        nn.Conv1d(3, 5, 3, stride=2, padding=1), torch.randn(3, 3, 11), torch.randn(3, 3, 11)
    )


@pytest.mark.parametrize("frozen", [None, "weight", "bias"])
@pytest.mark.parametrize("dims", [2, 3, 4])
def test_batchnorm_rule_in_evaluation_mode(dims, frozen):
    torch.manual_seed(5)
    norm = (nn.BatchNorm1d if dims < 4 else nn.BatchNorm2d)(4).eval()
    norm.running_mean.uniform_(-1, 1)
    norm.running_var.uniform_(0.5, 2)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
        norm.bias.uniform_(-0.5, 0.5)
    if frozen is not None:
        getattr(norm, frozen).requires_grad_(False)
    shape = (3, 4, 6, 5)[:dims]
    _check_rule(norm, torch.randn(shape), torch.randn(shape))


def test_frozen_weight_with_trainable_bias_moves_only_the_bias():
    torch.manual_seed(6)
    conv = nn.Conv2d(3, 4, 3)
    conv.weight.requires_grad_(False)
    _check_rule(conv, torch.randn(2, 3, 6, 6), torch.randn(2, 3, 6, 6))


@pytest.mark.parametrize(
    "module, shape",
    [
        (nn.Conv2d(3, 4, 3, padding=1), (2, 3, 7, 7)),  # formed: a 3x3 convolution, large input
        (nn.Conv2d(16, 32, 1), (2, 16, 30, 30)),  # formed: pointwise
        (nn.Linear(5, 6), (2, 40, 5)),  # formed: many tokens
        (nn.BatchNorm2d(3).eval(), (2, 3, 5, 5)),
    ],
)
def test_released_factors_run_the_layer_from_what_was_formed(module, shape):
    """The finite difference frees a layer's input and gradient once its update is formed; the
    layer at the update must not change, and the route must still be known from the shapes."""
    torch.manual_seed(7)
    module = module.double()
    inputs, new_inputs = torch.randn(shape).double(), torch.randn(shape).double()
    with torch.no_grad():
        factors = Factors(inputs, torch.randn_like(module(inputs)))
        rule = rule_for(module)
        scale = torch.tensor([0.5, -2.0], dtype=torch.float64)
        assert rule.reads_only_derived(factors)
        rule.squared_norm(factors)  # forms and caches the update, as before passes 3 and 4
        released = factors.released()
        assert released.inputs.is_meta and released.grads.is_meta
        assert rule.replaces(released) == rule.replaces(factors)
        if rule.replaces(factors):
            before = rule.output_at(new_inputs, factors, scale)
            after = rule.output_at(new_inputs, released, scale)
        else:
            shared = module(new_inputs)
            before = rule.correction(new_inputs, shared.shape, factors, scale)
            after = rule.correction(new_inputs, shared.shape, released, scale)
    assert not after.is_meta
    torch.testing.assert_close(after, before, rtol=0, atol=0)


def test_a_layer_on_the_gram_route_keeps_its_factors():
    conv = nn.Conv2d(64, 64, 3, padding=1)  # deep and small: the Gram matrix is cheaper
    factors = Factors(torch.randn(2, 64, 4, 4), torch.randn(2, 64, 4, 4))
    rule = rule_for(conv)
    assert rule._uses_gram(factors)
    assert not rule.reads_only_derived(factors)


def test_layer_bytes_per_example_counts_inputs_and_outputs_of_trainable_layers():
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 25, 2)
    )
    caller = ForwardCaller(model, model)
    modules = {"0": model[0], "3": model[3]}
    counted = layer_bytes_per_example(caller, modules, (torch.randn(1, 3, 5, 5),))
    assert counted == 4 * ((3 * 25 + 8 * 25) + (8 * 25 + 2))
    assert all(p.device.type == "cpu" for p in model.parameters())  # the model never moved


def test_auto_takes_the_loop_where_layers_are_large_per_example(monkeypatch):
    """Above the size limit "auto" gives exactly the loop's maps; below it, the factored ones."""
    torch.manual_seed(7)
    model = nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(6, 3),
    ).double()
    images = torch.randn(3, 3, 8, 8, dtype=torch.float64)
    order1 = LayerNormGradOrder1(model, model[1])
    loop = order1.attribute(images, target=[0, 1, 2], batch_mode="loop")
    factored = order1.attribute(images, target=[0, 1, 2], batch_mode="factored")
    assert not torch.equal(loop, factored)  # a different order of summation
    torch.testing.assert_close(factored, loop, rtol=1e-10, atol=1e-14)
    assert torch.equal(order1.attribute(images, target=[0, 1, 2]), factored)
    monkeypatch.setattr(plan, "FACTORED_EXAMPLE_BYTES", 100)
    assert torch.equal(
        LayerNormGradOrder1(model, model[1]).attribute(images, target=[0, 1, 2]), loop
    )


@pytest.mark.parametrize("examples, limit", [(4, 3), (5, 2), (16, 3), (7, 7), (3, 8), (1, 1)])
def test_chunks_are_at_most_the_limit_and_as_equal_as_can_be(examples, limit):
    chunks = plan.balanced_chunks(examples, limit)
    sizes = [stop - start for start, stop in chunks]
    assert [start for start, _ in chunks] == [0, *[stop for _, stop in chunks[:-1]]]
    assert chunks[-1][1] == examples
    assert max(sizes) <= limit and max(sizes) - min(sizes) <= 1
    assert len(chunks) == -(-examples // limit)  # no more chunks than the limit needs


@pytest.mark.parametrize("route", ["gram", "formed"])
@pytest.mark.parametrize(
    "conv, shape",
    [
        (nn.Conv2d(5, 7, 1), (3, 5, 6, 7)),
        (nn.Conv2d(5, 7, 1, stride=2, bias=False), (3, 5, 7, 6)),
        (nn.Conv2d(5, 7, 1, stride=(2, 3), dilation=2), (3, 5, 9, 8)),
        (nn.Conv1d(5, 7, 1, stride=2), (3, 5, 9)),
    ],
    ids=["1x1", "1x1-stride-2", "1x1-strides-2-3", "conv1d-1-stride-2"],
)
def test_pointwise_convolutions_run_as_matrix_products(conv, shape, route):
    """A 1x1 kernel without padding or groups: each example's weights as one batched matrix
    product (and its update formed by one), against autograd's update, by either route."""
    torch.manual_seed(5)
    assert rule_for(conv).pointwise
    _check_rule(conv, torch.randn(shape), torch.randn(shape), route=route)
