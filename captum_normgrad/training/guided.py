"""Guided backpropagation that can be switched on for one gradient computation of a forward pass.

Guided backpropagation (Springenberg et al., 2015) passes a gradient back through a ReLU only where
both the ReLU's input and the incoming gradient are positive: ``grad_in = [x > 0] * max(grad_out,
0)``. The plain ReLU backward already applies ``[x > 0]``; :func:`guided_relus` adds the
``max(grad_out, 0)`` with a gradient hook on each ``nn.ReLU`` output. The hooks obey a switch, so
one forward pass serves a guided gradient and plain ones (the training loss, Grad-CAM) alike, and
the clamp is an ordinary differentiable operation, so a guided gradient taken with
``create_graph=True`` can itself be trained through.

The model is not changed: no module is replaced, the forward hooks exist only inside the
``with`` block, and the gradient hooks left on that forward pass's tensors are inert once it ends.
ReLUs called as functions (``F.relu``, ``torch.relu``) cannot be hooked and stay plain, as in
Captum's ``GuidedBackprop``.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from torch import Tensor, nn

__all__ = ["GuidedSwitch", "guided_relus"]


class GuidedSwitch:
    """Turns guided backpropagation on for the gradient computations inside ``on()``."""

    def __init__(self) -> None:
        self.active = False
        self.closed = False
        self.relu_calls = 0

    @contextmanager
    def on(self) -> Iterator[None]:
        if self.closed:
            raise RuntimeError("the guided_relus block has ended; its hooks are gone")
        if self.relu_calls == 0:
            raise RuntimeError(
                "no nn.ReLU module ran in the forward pass, so guided backpropagation would equal "
                "the plain gradient; it needs ReLUs as modules (functional relu cannot be hooked)"
            )
        self.active = True
        try:
            yield
        finally:
            self.active = False

    def _clamp(self, gradient: Tensor) -> Tensor | None:
        return gradient.clamp(min=0) if self.active and not self.closed else None


@contextmanager
def guided_relus(model: nn.Module) -> Iterator[GuidedSwitch]:
    """Make the ``nn.ReLU`` modules of ``model`` guidable during the forward passes in the block.

    Args:
        model: the network; only its ``nn.ReLU`` submodules are hooked.

    Yields:
        A :class:`GuidedSwitch`; gradients computed inside ``switch.on()`` are guided.

    Example:
        >>> with guided_relus(model) as switch:
        ...     scores = model(images.requires_grad_()).gather(1, labels[:, None]).sum()
        ...     with switch.on():
        ...         guided, = torch.autograd.grad(scores, images, retain_graph=True)
        ...     plain, = torch.autograd.grad(scores, images)
    """
    switch = GuidedSwitch()

    def forward_hook(module: nn.Module, args: tuple, output: Tensor) -> None:
        switch.relu_calls += 1
        if isinstance(output, Tensor) and output.requires_grad:
            # Inert once the block has ended (the switch is closed), so the hook left on the
            # tensor can never guide a later backward pass.
            output.register_hook(switch._clamp)

    relus = [module for module in model.modules() if isinstance(module, nn.ReLU)]
    handles = [relu.register_forward_hook(forward_hook) for relu in relus]
    try:
        yield switch
    finally:
        switch.closed = True
        for handle in handles:
            handle.remove()
