"""``batch_mode="vmap"``: order 1's passes for ONE example as pure functions of the parameters,
vmapped over chunks of examples.

Written with ``torch.func`` so that ``torch.func.vmap`` can run a chunk of examples at once, each
with its own inner step (``batch_mode="vmap"``; the per-example loop is the plain-autograd
:mod:`captum_normgrad._order1.loop`). The parameters are only ever arguments of
``torch.func.functional_call``: the user's module is never stepped, so an exception mid-way has
nothing to undo.

torch.func differentiates function arguments, not intermediate tensors, so the gradient at a layer is
taken as the gradient with respect to a zero tensor added to the layer's activation (``x + 0``).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, jvp, vmap

from captum_normgrad._core.captum import run_forward
from captum_normgrad._core.capture import LayerRecord, capture_layers, check_each_ran_once
from captum_normgrad._core.front_door import explained_output
from captum_normgrad._core.hidden_states import activation_in, with_activation
from captum_normgrad._core.model_state import preserved_buffers
from captum_normgrad._order1.autograd import ForwardCaller, Parameters, step_size
from captum_normgrad._order1.examples import is_per_example
from captum_normgrad._order1.settings import Order1Settings

__all__ = [
    "PER_EXAMPLE",
    "ExampleLoss",
    "VmapPasses",
    "beyond_torch_func",
    "check_batch_first",
    "example_terms",
    "full_backward_hook_owner",
    "layers_at_theta",
]

# Stands in `ExampleLoss.static_args` for an additional forward argument taken from the example.
PER_EXAMPLE = object()


@contextmanager
def _zero_added_at(
    layers: Sequence[nn.Module], zeros: Sequence[Tensor], at_input: bool
) -> Iterator[list[Tensor | None]]:
    """Add ``zeros[i]`` to the activation of ``layers[i]`` and record that activation.

    The rest of the network sees ``x + 0``, a new tensor: an in-place operation downstream
    (torchvision's ``ReLU(inplace=True)``) cannot overwrite the recorded ``x``. Hooks are removed
    when the block ends, also when it raises.
    """
    activations: list[Tensor | None] = [None] * len(layers)

    def output_hook(index: int):
        def hook(module: nn.Module, args: tuple, output: object) -> object:
            activation = activation_in(module, output)
            activations[index] = activation
            return with_activation(module, output, activation + zeros[index])

        return hook

    def input_hook(index: int):
        def hook(module: nn.Module, args: tuple) -> tuple:
            activations[index] = args[0].clone()  # the model may change it in place later
            return (args[0] + zeros[index], *args[1:])

        return hook

    handles = []
    try:
        for index, layer in enumerate(layers):
            if at_input:
                handles.append(layer.register_forward_pre_hook(input_hook(index)))
            else:
                handles.append(layer.register_forward_hook(output_hook(index)))
        yield activations
    finally:
        for handle in handles:
            handle.remove()


class ExampleLoss:
    """``(theta, zeros, example) -> (loss, activations)`` for one example, batch dimension 1.

    Args:
        caller: the :class:`ForwardCaller` around the user's model.
        layers: the attributed modules.
        at_input: take the layer's input instead of its output.
        loss: ``loss(outputs, target) -> (1,)``; the labels were validated before any pass.
        static_args: the additional forward arguments, with :data:`PER_EXAMPLE` where the example
            supplies one.

    ``theta`` holds the trainable parameters (frozen ones are the module's own); ``example`` is a
    dict with ``inputs`` (tuple), ``args`` (tuple, one entry per :data:`PER_EXAMPLE`),
    ``target`` and ``buffers`` (copied on each pass, so BatchNorm in train mode updates only copies).
    """

    def __init__(
        self,
        caller: ForwardCaller,
        layers: Sequence[nn.Module],
        at_input: bool,
        loss: Callable[[Tensor, object], Tensor],
        static_args: tuple,
    ) -> None:
        self.caller = caller
        self.layers = list(layers)
        self.at_input = at_input
        self.loss = loss
        self.static_args = static_args

    def _forward_args(self, example: dict) -> tuple:
        per_example = iter(example["args"])
        args = tuple(next(per_example) if arg is PER_EXAMPLE else arg for arg in self.static_args)
        return (*example["inputs"], *args)

    def __call__(
        self, theta: Parameters, zeros: Sequence[Tensor], example: dict
    ) -> tuple[Tensor, list[Tensor]]:
        with _zero_added_at(self.layers, zeros, self.at_input) as activations:
            outputs = functional_call(
                self.caller,
                # Fresh copies made inside the transform: BatchNorm in train mode may update them.
                {**theta, **{name: b.clone() for name, b in example["buffers"].items()}},
                self._forward_args(example),
                strict=False,
            )
        return self.loss(outputs, example["target"]).sum(), activations


def _moved(theta: Parameters, direction: Parameters, step: Tensor) -> Parameters:
    """``theta + step * direction``, out of place: under vmap a parameter the forward never uses has
    an unbatched zero gradient, which cannot be written into batched storage in place."""
    return {name: theta[name] + step * direction[name] for name in theta}


def example_terms(
    loss_fn: ExampleLoss,
    theta: Parameters,
    zeros: Sequence[Tensor],
    example: dict,
    settings: Order1Settings,
) -> tuple[list[Tensor], list[Tensor]]:
    """For one example: ``x(theta')`` and ``g(theta') - lr * H(theta) v`` at each layer.

    ``theta' = theta - lr * grad l(theta)`` and ``v = grad l(theta')``; ``H(theta) v`` is the
    directional derivative of the layer gradient ``g`` along ``v``, by the central difference
    ``(g(theta + h v) - g(theta - h v)) / 2h`` (four passes in all) or exactly, forward-over-reverse
    (three passes, the last one carrying tangents). ``lr`` is ``+eps`` for order 1 and ``-eps`` for
    the adversarial map.
    """

    def loss(params: Parameters) -> Tensor:
        return loss_fn(params, zeros, example)[0]

    def layer_gradients(params: Parameters) -> tuple[Tensor, ...]:
        return tuple(grad(loss_fn, argnums=1, has_aux=True)(params, zeros, example)[0])

    learning_rate = settings.learning_rate
    first = grad(loss)(theta)
    stepped = {name: torch.add(theta[name], first[name], alpha=-learning_rate) for name in theta}
    del first  # one model-sized copy per example fewer at the peak
    (direction, gradients), activations = grad(loss_fn, argnums=(0, 1), has_aux=True)(
        stepped, zeros, example
    )
    del stepped
    if settings.exact_hvp:
        with warnings.catch_warnings():
            # torch's first forward-mode call loads decompositions through torch.jit.script, which
            # warns about its own deprecation; nothing the user can act on.
            warnings.filterwarnings("ignore", "`torch.jit.script` is deprecated", FutureWarning)
            _, hessian_terms = jvp(layer_gradients, (theta,), (direction,))
    else:
        h = step_size(direction, settings.h_scale)
        plus = layer_gradients(_moved(theta, direction, h))
        minus = layer_gradients(_moved(theta, direction, -h))
        hessian_terms = [(p - m) / (2 * h) for p, m in zip(plus, minus)]
    corrected = [g - learning_rate * hv for g, hv in zip(gradients, hessian_terms)]
    return list(activations), corrected


def layers_at_theta(
    forward_func: Callable[..., Tensor],
    model: nn.Module,
    layers: Sequence[nn.Module],
    at_input: bool,
    inputs: tuple[Tensor, ...],
    args: tuple,
) -> tuple[list[LayerRecord], object]:
    """One forward pass without autograd at ``theta`` (the model's buffers restored): each
    layer's record (its activation, whose shape the vmapped zeros take) and the outputs, from
    which the labels are resolved before the passes that need them."""
    with (
        torch.no_grad(),
        preserved_buffers([model]),
        capture_layers(forward_func, layers, at_input=at_input) as records,
    ):
        outputs = explained_output(run_forward(forward_func, inputs, None, args or None))
    check_each_ran_once(records)
    return records, outputs


def check_batch_first(records: Sequence[LayerRecord], num_examples: int) -> None:
    for record in records:
        if record.activation.shape[0] != num_examples:
            raise ValueError(
                f"layer '{record.name}' has an activation of shape "
                f"{tuple(record.activation.shape)}, whose first dimension is not the batch of "
                f"{num_examples}; order 1 needs batch-first activations"
            )


class VmapPasses:
    """The passes for a chunk of examples: :func:`example_terms` under ``torch.func.vmap``, each
    example keeping a batch dimension of 1 inside it.

    Args:
        caller: the :class:`ForwardCaller` around the user's model.
        forward_func: the user's forward function (it names the layers in error messages).
        layers: the attributed modules.
        at_input: take the layers' inputs instead of their outputs.
        loss: ``loss(outputs, target) -> (1,)``; the labels are validated before any pass.
        theta: the trainable parameters (detached, named as ``caller`` names them).
        buffers: the model's buffers (each pass works on copies).
        args: the batch's additional forward arguments; batch-first tensors are the examples'.
        target: the batch's target as the user gave it (its form says whether each example has
            its own row); ``None`` with ``cross_entropy``.
        cross_entropy: the resolved target is one class index per example.
    """

    def __init__(
        self,
        caller: ForwardCaller,
        forward_func: Callable[..., Tensor],
        layers: Sequence[nn.Module],
        at_input: bool,
        loss: Callable[[Tensor, object], Tensor],
        theta: Parameters,
        buffers: dict[str, Tensor],
        args: tuple,
        target: object,
        cross_entropy: bool,
        num_examples: int,
    ) -> None:
        self.forward_func = forward_func
        self.model = caller.model
        self.layers = list(layers)
        self.at_input = at_input
        self.theta = theta
        self.buffers = buffers
        self.per_example = [is_per_example(a, num_examples) for a in args]
        self.loss_fn = ExampleLoss(
            caller,
            layers,
            at_input,
            loss,
            tuple(PER_EXAMPLE if each else a for a, each in zip(args, self.per_example)),
        )
        self.target_batched = cross_entropy or (
            isinstance(target, Tensor) and is_per_example(target, num_examples)
        )
        self.list_target = not self.target_batched and isinstance(target, list) and len(target) > 1

    def hooks(self) -> AbstractContextManager[object]:
        """Nothing lives for the whole call: each vmapped pass adds its zeros at the layers."""
        return nullcontext(self)

    def terms(
        self,
        forward_args: tuple,
        resolve_target: Callable[[Tensor], object],
        settings: Order1Settings,
    ) -> tuple[list[Tensor], list[Tensor]]:
        """``x(theta')`` and ``g(theta') - lr H(theta) v`` at each layer for the chunk whose forward
        arguments are ``forward_args`` (batch first). The vmapped passes take the labels as an
        input, so one forward pass of the chunk at ``theta`` without autograd resolves them."""
        size = forward_args[0].shape[0]
        split = len(forward_args) - len(self.per_example)
        inputs, args = forward_args[:split], forward_args[split:]
        records, outputs = layers_at_theta(
            self.forward_func, self.model, self.layers, self.at_input, inputs, args
        )
        target = resolve_target(outputs)
        check_batch_first(records, size)
        if self.list_target:
            raise ValueError(
                "batch_mode='vmap' with a callable loss needs target as a tensor (one row per "
                "example), an int or None, not a list; pass torch.tensor(target) or "
                "batch_mode='loop'"
            )
        zeros = [
            record.activation.new_zeros((1, *record.activation.shape[1:])) for record in records
        ]
        example = {
            # Each vmapped example keeps a batch dimension of 1, as the model expects.
            "inputs": tuple(x.unsqueeze(1) for x in inputs),
            "args": tuple(
                a.detach().unsqueeze(1) for a, each in zip(args, self.per_example) if each
            ),
            "target": target.unsqueeze(1) if self.target_batched else target,
            # Batched (one per example), so BatchNorm in train mode can update them under vmap.
            "buffers": {n: b.expand(size, *b.shape) for n, b in self.buffers.items()},
        }
        in_dims = (
            {"inputs": 0, "args": 0, "target": 0 if self.target_batched else None, "buffers": 0},
        )

        def one_example(example: dict) -> tuple[list[Tensor], list[Tensor]]:
            return example_terms(self.loss_fn, self.theta, zeros, example, settings)

        activations, corrected = vmap(one_example, in_dims=in_dims)(example)
        return [a.flatten(0, 1) for a in activations], [c.flatten(0, 1) for c in corrected]


def full_backward_hook_owner(model: nn.Module) -> str | None:
    """The name of a module with a full backward hook (torch.func cannot run those), if any."""
    for name, module in model.named_modules():
        if module._backward_hooks and module._is_full_backward_hook:
            return name or type(module).__name__
    if nn.modules.module._global_backward_hooks:
        return "every module (a global full backward hook)"
    return None


def beyond_torch_func(error: RuntimeError) -> bool:
    """What torch.func transforms refuse and plain autograd runs: activation checkpointing (saved
    tensor hooks), ``autograd.Function`` without ``setup_context``."""
    message = str(error)
    return "saved tensor hooks" in message or "setup_context" in message
