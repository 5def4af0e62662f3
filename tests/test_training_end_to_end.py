"""A small CNN trained a few steps on synthetic images whose object location is known.

Each 12x12 image holds a 4x4 square at a random place, bright for class 0 and dark for class 1,
in Gaussian noise: the object is the only evidence, so maps that move onto it are measurable as
the share of the map's mass inside the square.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from captum_normgrad.training import (
    DifferentiableGradCam,
    DifferentiableNormGrad,
    GuidedGradientAlignment,
    NormGradMonitor,
    SaliencyPenalisedLoss,
    train_only,
)

SIZE, OBJECT = 12, 4


pytestmark = pytest.mark.usefixtures("one_thread")


def _synthetic(count, generator):
    labels = torch.randint(0, 2, (count,), generator=generator)
    top = torch.randint(0, SIZE - OBJECT + 1, (count, 1, 1), generator=generator)
    left = torch.randint(0, SIZE - OBJECT + 1, (count, 1, 1), generator=generator)
    rows = torch.arange(SIZE)[None, :, None]
    cols = torch.arange(SIZE)[None, None, :]
    inside_rows = (rows >= top) & (rows < top + OBJECT)
    inside_cols = (cols >= left) & (cols < left + OBJECT)
    masks = (inside_rows & inside_cols).float()[:, None]
    polarity = (1 - 2 * labels.float())[:, None, None, None]
    noise = 0.3 * torch.randn(count, 1, SIZE, SIZE, generator=generator)
    return noise + polarity * masks, labels, masks


def _share_on_object(maps, masks):
    """Mean over examples of the fraction of |map| that lies on the object."""
    magnitude = maps.detach().abs().sum(dim=1, keepdim=True)
    magnitude = F.interpolate(magnitude, size=(SIZE, SIZE), mode="bilinear")
    return ((magnitude * masks).sum(dim=(1, 2, 3)) / magnitude.sum(dim=(1, 2, 3))).mean().item()


def _cnn():
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(4, 8, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 2),
    )


def _mean(values):
    return sum(values) / len(values)


def test_penalised_training_moves_the_maps_onto_the_object():
    # right_weight=0 is the paper's ablation without eq. 6: what remains (eqs. 4-5 on
    # max-normalised maps) rewards compact maps, so the penalty can only fall as maps gather.
    generator = torch.Generator().manual_seed(0)
    held_out, held_out_labels, held_out_masks = _synthetic(64, generator)
    model = _cnn()
    loss_fn = SaliencyPenalisedLoss(
        DifferentiableNormGrad(model, model[2]), lam=0.2, right_weight=0
    )
    optimiser = torch.optim.Adam(model.parameters(), lr=0.05)
    before = _share_on_object(loss_fn(held_out, held_out_labels).maps, held_out_masks)
    penalties, monitored = [], []
    with NormGradMonitor(model, [model[0], model[2]]) as monitor:
        for _ in range(40):
            images, labels, masks = _synthetic(32, generator)
            terms = loss_fn(images, labels)
            optimiser.zero_grad()
            terms.loss.backward()
            optimiser.step()
            penalties.append(terms.saliency_penalty.mean().item())
            monitored.append(_share_on_object(monitor.latest.maps["2"], masks))
    after = loss_fn(held_out, held_out_labels)
    assert _mean(penalties[-5:]) < 0.3 * _mean(penalties[:5])
    assert _share_on_object(after.maps, held_out_masks) > before + 0.1
    assert _mean(monitored[-5:]) > _mean(monitored[:5]) + 0.05
    assert after.correct.mean() > 0.9


def test_the_papers_set_up_fine_tunes_one_layer_and_broadens_right_maps():
    # Pre-train with cross-entropy, then train only the last convolution with eq. 7 as the paper
    # does. Predictions are right, so eq. 6 rewards broader maps: confidence (extent) rises.
    generator = torch.Generator().manual_seed(0)
    model = _cnn()
    optimiser = torch.optim.Adam(model.parameters(), lr=0.05)
    for _ in range(10):
        images, labels, _ = _synthetic(32, generator)
        optimiser.zero_grad()
        F.cross_entropy(model(images), labels).backward()
        optimiser.step()
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not n.startswith("2.")}
    trained = model[2].weight.detach().clone()
    loss_fn = SaliencyPenalisedLoss(DifferentiableGradCam(model, model[2]), lam=0.5)
    penalties, confidences = [], []
    with train_only(model, model[2]) as trainable:
        optimiser = torch.optim.Adam(trainable, lr=0.01)
        for _ in range(20):
            images, labels, _ = _synthetic(32, generator)
            terms = loss_fn(images, labels)
            optimiser.zero_grad()
            terms.loss.backward()
            optimiser.step()
            penalties.append(terms.saliency_penalty.mean().item())
            confidences.append(terms.confidence.mean().item())
    assert terms.correct.mean() > 0.9
    assert _mean(penalties[-5:]) < _mean(penalties[:5])
    assert _mean(confidences[-5:]) > _mean(confidences[:5])
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if n in frozen)
    assert not torch.equal(model[2].weight, trained)


def test_alignment_training_makes_input_gradients_guided_and_object_centred():
    generator = torch.Generator().manual_seed(0)
    model = _cnn()
    loss_fn = GuidedGradientAlignment(model, weight=1.0)
    optimiser = torch.optim.Adam(model.parameters(), lr=0.05)
    alignments, on_object = [], []
    for _ in range(40):
        images, labels, masks = _synthetic(32, generator)
        terms = loss_fn(images, labels)
        optimiser.zero_grad()
        terms.loss.backward()
        optimiser.step()
        alignments.append(terms.alignment.mean().item())
        on_object.append(_share_on_object(terms.plain_gradient, masks))
    assert _mean(alignments[-5:]) < 0.2 * _mean(alignments[:5])
    assert _mean(on_object[-5:]) > _mean(on_object[:5]) + 0.03
    assert (terms.outputs.argmax(dim=1) == labels).float().mean() > 0.9
