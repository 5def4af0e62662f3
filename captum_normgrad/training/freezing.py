"""Train one chosen part of a model with every other parameter frozen, for the duration of a block."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

from torch import nn

__all__ = ["train_only"]


@contextmanager
def train_only(model: nn.Module, modules: nn.Module | Sequence[nn.Module]) -> Iterator[list]:
    """Let gradients reach only the parameters of ``modules``; restore every flag on exit.

    The set-up of the saliency-penalised loss (``papers/002``, section 3.2): update one chosen
    layer of a trained network, or a newly added layer in transfer learning, with all other
    weights frozen. Inside the block ``requires_grad`` is ``True`` exactly for the parameters of
    ``modules`` (so ``loss.backward()`` neither computes nor stores the others' gradients); on exit,
    also on an exception, each parameter gets its own flag back.

    Args:
        model: the whole network.
        modules: the submodule(s) to train.

    Yields:
        The trainable parameters, to hand to the optimiser.

    Raises:
        ValueError: a module that is not part of ``model``, or that has no parameters.

    Example:
        >>> with train_only(model, model.features[28]) as trainable:
        ...     optimiser = torch.optim.SGD(trainable, lr=1e-3)
        ...     for images, labels in loader:
        ...         ...
    """
    modules = [modules] if isinstance(modules, nn.Module) else list(modules)
    if not modules:
        raise ValueError("give at least one module to train")
    in_model = {id(module) for module in model.modules()}
    chosen: dict[int, nn.Parameter] = {}
    for module in modules:
        if not isinstance(module, nn.Module) or id(module) not in in_model:
            raise ValueError(f"{type(module).__name__} is not a submodule of the model")
        parameters = list(module.parameters())
        if not parameters:
            raise ValueError(f"{type(module).__name__} module has no parameters to train")
        chosen.update((id(parameter), parameter) for parameter in parameters)
    saved = {id(p): (p, p.requires_grad) for p in model.parameters()}
    saved.update((key, (p, p.requires_grad)) for key, p in chosen.items())
    try:
        for key, (parameter, _) in saved.items():
            parameter.requires_grad_(key in chosen)
        yield list(chosen.values())
    finally:
        for parameter, flag in saved.values():
            parameter.requires_grad_(flag)
