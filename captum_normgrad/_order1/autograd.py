"""Plain autograd pieces every batch mode of order 1 shares: the forward caller, gradients (zeros
where an input is unused), the mixed second derivative, the finite difference's step, and attention
that autograd and torch.func can differentiate.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, nullcontext

import torch
from torch import Tensor, nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from captum_normgrad._core.front_door import explained_output

__all__ = [
    "ForwardCaller",
    "Parameters",
    "differentiable_attention",
    "gradients_or_zeros",
    "second_derivative",
    "step_size",
]

Parameters = dict[str, Tensor]


class ForwardCaller(nn.Module):
    """A module whose forward is the user's forward function, so ``functional_call`` can evaluate it
    with replaced parameters of ``model`` (names are prefixed ``model.``).

    ``forward_func`` is the model itself or a bound method of it (``model.features``, a method
    returning logits); the model is held as a child, which does not change it.
    """

    def __init__(self, model: nn.Module, forward_func: Callable[..., Tensor]) -> None:
        super().__init__()
        self.model = model
        # Kept outside the module registry: when it is `model` itself it must not be a second child.
        self._method = None if forward_func is model else forward_func

    def forward(self, *args: object) -> Tensor:
        """The tensor to explain: every pass of every mode reads the outputs through here, so a
        ``ModelOutput`` gives its logits and a tuple is refused as order 0 refuses it."""
        outputs = self.model(*args) if self._method is None else self._method(*args)
        return explained_output(outputs)


def gradients_or_zeros(
    output: Tensor | Sequence[Tensor],
    inputs: Sequence[Tensor | None],
    *,
    cotangents: Sequence[Tensor] | None = None,
    create_graph: bool = False,
) -> list[Tensor]:
    """``d output / d inputs``, or ``d <outputs, cotangents> / d inputs`` (the cotangents held
    fixed); an input the output does not depend on gets a zero gradient (an unused head's
    parameters; a layer whose path to the output the model cuts)."""
    outputs = [output] if isinstance(output, Tensor) else list(output)
    used = [i for i, tensor in enumerate(inputs) if tensor is not None and tensor.requires_grad]
    found: tuple = ()
    if used and any(t.requires_grad for t in outputs):
        try:
            found = torch.autograd.grad(
                outputs,
                [inputs[i] for i in used],
                grad_outputs=cotangents,
                create_graph=create_graph,
                allow_unused=True,
            )
        except RuntimeError as error:
            if re.search(r"(?:not |in)compatible with \.grad\(\)", str(error)):
                raise ValueError(
                    "the model uses reentrant activation checkpointing "
                    "(torch.utils.checkpoint with use_reentrant=True), which computes no gradient "
                    "through torch.autograd.grad; order 1 needs it. Use use_reentrant=False"
                ) from error
            raise
    gradients: list[Tensor | None] = [None] * len(inputs)
    for i, gradient in zip(used, found):
        gradients[i] = gradient
    # Zeros only where needed: a parameter-sized allocation per call costs page faults.
    return [
        torch.zeros_like(t) if g is None and t is not None else g for g, t in zip(gradients, inputs)
    ]


def second_derivative(
    gradients: Sequence[Tensor], directions: Sequence[Tensor], zeros: list[Tensor | None]
) -> list[Tensor]:
    """``d <gradients, directions> / d zeros``, the directions held fixed: a backward through the
    backward that made ``gradients`` (kept in the graph), starting from ``directions`` as their
    cotangents, so no product is formed. Refused, naming the operation, where PyTorch has no
    second derivative (``hardsigmoid`` in MobileNetV3)."""
    pairs = [(g, d) for g, d in zip(gradients, directions, strict=True) if g.requires_grad]
    if not pairs:  # no parameter gradient depends on anything
        return [torch.zeros_like(z) for z in zeros]
    try:
        return gradients_or_zeros(
            [g for g, _ in pairs], zeros, cotangents=[d.detach() for _, d in pairs]
        )
    except (RuntimeError, NotImplementedError) as error:
        missing = re.search(r"derivative for (\S+) is not implemented", str(error))
        if missing is None:
            raise
        raise ValueError(
            f"hvp='exact' differentiates the model's gradient a second time, and PyTorch has no "
            f"derivative of {missing.group(1)}, which this model uses; use "
            "hvp='finite_difference' (the paper's)"
        ) from error


def step_size(direction: Parameters, h_scale: float) -> Tensor:
    """The paper's finite-difference step ``h = h_scale / ||direction||_2`` (all parameters as one
    vector). A zero direction gives a zero Hessian-vector product for any finite ``h``."""
    norm = torch.linalg.vector_norm(
        torch.stack([torch.linalg.vector_norm(d) for d in direction.values()])
    )
    return torch.where(norm > 0, h_scale / norm, torch.full_like(norm, h_scale))


@contextmanager
def differentiable_attention(math_kernel: bool) -> Iterator[None]:
    """Attention that autograd and torch.func can differentiate, for the passes only (restored).

    ``nn.MultiheadAttention`` in eval mode takes a fused inference kernel when it sees no autograd,
    which is what torch.func's wrapped tensors (and the loop's passes 3-4 before the layer) look like
    to it: the fast path is switched off so every pass runs the same ``scaled_dot_product_attention``.
    The fused SDPA kernels (flash, memory efficient) have no vmap batching rule and no second
    derivative, so the exact HVP (a double backward) and the vmapped passes use the math kernel.
    """
    enabled = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with sdpa_kernel(SDPBackend.MATH) if math_kernel else nullcontext():
            yield
    finally:
        torch.backends.mha.set_fastpath_enabled(enabled)
