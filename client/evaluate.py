"""Quality of the served heatmaps: do the pixels a map points at really drive the prediction?

- Deletion (Petsiuk et al. 2018, RISE, arXiv 1806.07421): replace pixels with a blurred copy, most
  salient first; the explained class's probability should fall fast: lower area under the curve
  (AUC) is better.
- Insertion: start from the blurred image and put the pixels back in the same order: higher AUC
  is better.
- Average drop (Chattopadhay et al. 2018): the relative loss of confidence once the top 20% of the
  pixels are deleted: higher means the map found what mattered.
A smooth random map (random 7x7 values, resized) is the baseline each method must beat.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import cv2
import numpy as np

from .api import CamClient
from .overlay import read_image

CHUNK = 8  # images per predict request: fits a batching server's max_batch_size


@dataclasses.dataclass
class Scores:
    deletion_auc: float
    insertion_auc: float
    drop_at_20: float


def curves(
    client: CamClient, image: np.ndarray, heatmap: np.ndarray, class_index: int, steps: int
) -> tuple[np.ndarray, np.ndarray]:
    """Probability of `class_index` as pixels are deleted and inserted, at `steps`+1 fractions."""
    height, width = heatmap.shape
    order = np.argsort(-heatmap.ravel(), kind="stable")
    baseline = cv2.GaussianBlur(image, (0, 0), sigmaX=max(height, width) / 8)
    variants = []
    for inserting in (False, True):
        for fraction in np.linspace(0, 1, steps + 1):
            mask = np.zeros(height * width, bool)
            mask[order[: int(round(fraction * height * width))]] = True
            mask = mask.reshape(height, width, 1)
            variants.append(np.where(mask, image, baseline) if inserting else np.where(mask, baseline, image))
    batch = np.stack(variants)
    probabilities = np.concatenate(
        [
            client.call("predict", {"images": batch[i : i + CHUNK]}, ["probabilities"])["probabilities"]
            for i in range(0, len(batch), CHUNK)
        ]
    )[:, class_index]
    return probabilities[: steps + 1], probabilities[steps + 1 :]


def score(client: CamClient, image: np.ndarray, heatmap: np.ndarray, class_index: int, steps: int) -> Scores:
    deletion, insertion = curves(client, image, heatmap, class_index, steps)
    x = np.linspace(0, 1, steps + 1)
    at_20 = deletion[int(round(0.2 * steps))]
    return Scores(
        deletion_auc=float(np.trapezoid(deletion, x)),
        insertion_auc=float(np.trapezoid(insertion, x)),
        drop_at_20=float(max(0.0, deletion[0] - at_20) / deletion[0]) if deletion[0] > 0 else 0.0,
    )


def _sized(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """A uint8 H×W×3 RGB array at the model input size, so that the maps line up with its pixels."""
    if image.shape[:2] == tuple(size):
        return image
    shrink = image.shape[0] > size[0] and image.shape[1] > size[1]
    return cv2.resize(image, (size[1], size[0]), interpolation=cv2.INTER_AREA if shrink else cv2.INTER_LINEAR)


def score_images(
    client: CamClient, paths: Sequence[str], methods: Sequence[str], steps: int = 10, seed: int = 0
) -> dict[str, list[Scores]]:
    """Scores per method (and `random`), one per image in `paths` order, each explained for its top-1 class."""
    rng = np.random.default_rng(seed)
    size = client.model_image_size()
    per_method: dict[str, list[Scores]] = {m: [] for m in [*methods, "random"]}
    for path in paths:
        image = _sized(cv2.cvtColor(read_image(path), cv2.COLOR_BGR2RGB), size)
        for method in methods:
            result = client.explain(image, method=method, heatmap="float")
            per_method[method].append(score(client, image, result.heatmap, result.class_index, steps))
        random_map = cv2.resize(rng.random((7, 7), np.float32), (size[1], size[0]))
        per_method["random"].append(score(client, image, random_map, result.class_index, steps))
    return per_method


def mean(scores: Sequence[Scores]) -> Scores:
    return Scores(*(float(np.mean([getattr(s, f.name) for s in scores])) for f in dataclasses.fields(Scores)))


def evaluate(
    client: CamClient, paths: Sequence[str], methods: Sequence[str], steps: int = 10, seed: int = 0
) -> dict[str, Scores]:
    """Mean scores per method (and `random`) over the images, each explained for its top-1 class."""
    return {method: mean(scores) for method, scores in score_images(client, paths, methods, steps, seed).items()}


def table(results: dict[str, Scores]) -> str:
    width = max(len("method"), *map(len, results))
    lines = [
        f"{'method':<{width}s} {'deletion AUC (lower better)':>28s} {'insertion AUC (higher)':>23s} "
        f"{'drop at 20% (higher)':>21s}"
    ]
    for method, s in results.items():
        lines.append(f"{method:<{width}s} {s.deletion_auc:28.3f} {s.insertion_auc:23.3f} {s.drop_at_20:21.3f}")
    return "\n".join(lines)
