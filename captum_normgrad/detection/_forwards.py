"""One image's detector pass as the tensor NormGrad explains: its training loss, or one score.

The public methods explain ``forward_func(inputs) -> tensor`` for a batch; a detector takes a
list of images and returns a loss dict or a list of detections. These two modules wrap it for
one image (batch of one), so that every method, order 1 included, runs on a detector unchanged.
The detector is a child module, so its parameters are the wrapper's (order 1 steps them
functionally) and its buffers are preserved by the method like any model's.
"""

from __future__ import annotations

from torch import Tensor, nn

from captum_normgrad.detection._modes import eval_mode, fixed_sampling, loss_mode

__all__ = ["ImageDetectionScore", "ImageTrainingLoss", "summed_loss"]


class ImageTrainingLoss(nn.Module):
    """``(1,)``: the detector's training objective on one image, the sum of its loss dict.

    Each forward runs in :func:`loss_mode` with the sampling seeded by ``seed``, so that every
    pass over the image (order 1's four) computes the same function of the parameters.
    """

    def __init__(self, detector: nn.Module, target: dict[str, Tensor], seed: int) -> None:
        super().__init__()
        self.detector = detector
        self.target = target
        self.seed = seed

    def forward(self, image: Tensor) -> Tensor:
        with loss_mode(self.detector), fixed_sampling(self.detector, self.seed):
            losses = self.detector(list(image), [self.target])
        return sum(losses.values()).reshape(1)


def summed_loss(outputs: Tensor, target: object) -> Tensor:
    """The callable loss the methods backpropagate: the wrapper's output is already the loss."""
    return outputs


class ImageDetectionScore(nn.Module):
    """``(1, 1)``: the score of one image's detection ``detection`` (eval mode), to explain with
    ``loss="output"`` and ``target=0``.

    Raises:
        ValueError: the image has no detection of that index (refused, never a map of zeros).
    """

    def __init__(self, detector: nn.Module, detection: int, image_index: int) -> None:
        super().__init__()
        self.detector = detector
        self.detection = detection
        self.image_index = image_index

    def forward(self, image: Tensor) -> Tensor:
        with eval_mode(self.detector):
            scores = self.detector(list(image))[0]["scores"]
        if self.detection >= scores.shape[0]:
            raise ValueError(
                f"detection={self.detection} is out of range for images[{self.image_index}], on "
                f"which the detector returned {scores.shape[0]} detections"
            )
        return scores[self.detection].reshape(1, 1)
