"""How far a reduced --precision moves the explanation from float32, measured at export.

With `--precision bfloat16` or `float16` the backbone and head compute in that type, while the
explanation math stays float32 (explainer.py). Rounding still moves the activations and gradients the
maps are made of. So the exporter runs every method on probe images (the repository's sample photos,
shipped in the package as data/probes/, and noise) twice, on the same weights, each time traced afresh:
once computing as exported, and once with every layer computing in float32. It compares the maps of
the same class (float32's top-1), and the top-1 classes. A map that drifts past the tolerance below
gets a `PrecisionWarning`.

The tolerances are well above the drift measured on the synthetic shapes model and on ResNet50
(docs/BENCHMARKS.md); tests/test_precision.py checks them independently, through TF Serving's loader.
"""

from __future__ import annotations

import dataclasses
import pathlib
import warnings
from typing import TYPE_CHECKING

import numpy as np
import tensorflow as tf

from .backbone import set_precision

if TYPE_CHECKING:
    from .explainer import Explainer

PROBES = pathlib.Path(__file__).resolve().parent / "data" / "probes"  # made as data/SOURCES.md says


@dataclasses.dataclass(frozen=True)
class Tolerance:
    heatmap_max: float  # largest |map - float32 map| over all pixels of the probes (maps are 0..1)
    heatmap_mean: float  # mean |map - float32 map|


TOLERANCES = {
    "bfloat16": Tolerance(heatmap_max=0.1, heatmap_mean=0.01),  # 8-bit significand
    "float16": Tolerance(heatmap_max=0.02, heatmap_mean=0.002),  # 11-bit significand
}


class PrecisionWarning(UserWarning):
    """A reduced-precision export whose maps drift from float32 past the tolerance."""


@dataclasses.dataclass(frozen=True)
class Drift:
    method: str
    heatmap_max: float
    heatmap_mean: float
    top1_agreement: float  # share of probes whose top-1 class is float32's

    def within(self, tolerance: Tolerance) -> bool:
        # NaN (an overflow in float16) is never within.
        return self.heatmap_max <= tolerance.heatmap_max and self.heatmap_mean <= tolerance.heatmap_mean

    def __str__(self) -> str:
        return (f"{self.method}: heatmap max {self.heatmap_max:.4f}, mean {self.heatmap_mean:.5f}; "
                f"top-1 agreement {self.top1_agreement:.0%}")


def probe_images(image_size: tuple[int, int], noise: int = 1) -> np.ndarray:
    """The probe photos resized to the model's input, and `noise` seeded noise images: uint8 [N,H,W,3].
    Without the photos the check would measure noise alone: a package that lacks them is refused."""
    paths = sorted(PROBES.glob("*.jpg"))
    if not paths:
        raise FileNotFoundError(f"no probe images in {PROBES}: this installation lacks the package data of the "
                                "--precision check (export/data/SOURCES.md says how they are made)")
    photos = [tf.image.decode_image(path.read_bytes(), channels=3, expand_animations=False) for path in paths]
    resized = [tf.cast(tf.round(tf.image.resize(p, image_size)), tf.uint8).numpy() for p in photos]
    rng = np.random.default_rng(0)
    resized += [rng.integers(0, 256, (*image_size, 3), dtype=np.uint8) for _ in range(noise)]
    return np.stack(resized)


def _run(explainer: Explainer, pixels: tf.Tensor, class_index: tf.Tensor) -> dict[str, dict[str, np.ndarray]]:
    """method -> its outputs on every image, traced now (so under the layers' current dtype policy), in one
    batch: the images once per method, each copy's rows naming its method (one trace instead of one a method)."""
    names, n = list(explainer.methods), len(pixels)
    explain = tf.function(explainer.explain)
    out = explain(tf.tile(pixels, [len(names), 1, 1, 1]), tf.tile(class_index, [len(names)]),
                  tf.repeat(tf.range(len(names)), n))
    return {name: {k: out[k].numpy()[i * n:(i + 1) * n] for k in ("heatmap", "logits")} for i, name in enumerate(names)}


def measure(explainer: Explainer, images: np.ndarray, precision: str) -> list[Drift]:
    """Drift of every method of `explainer` (computing in `precision`) from float32, on `images`."""
    # Inline passes, traced under the dtype policy of each run below: shared functions (signatures.py)
    # would be traced once, under one policy, and the two runs would agree whatever the precision.
    explainer = explainer.with_passes()
    pixels = tf.constant(images, tf.float32)
    models = (explainer.features, explainer.head)
    for model in models:
        set_precision(model, "float32")
    try:
        reference = _run(explainer, pixels, tf.fill([len(images)], -1))
    finally:
        for model in models:
            set_precision(model, precision)
    # The maps of the class float32 predicts (the logits do not depend on the method).
    top1 = next(iter(reference.values()))["logits"].argmax(axis=1).astype(np.int32)
    got = _run(explainer, pixels, tf.constant(top1))
    drifts = []
    for name, expected in reference.items():
        diff = np.abs(got[name]["heatmap"].astype(np.float64) - expected["heatmap"])
        drifts.append(Drift(name, float(diff.max()), float(diff.mean()),
                            float(np.mean(got[name]["logits"].argmax(axis=1) == top1))))
    return drifts


def check(explainer: Explainer, image_size: tuple[int, int], precision: str) -> list[Drift]:
    """Measure the drift of a reduced-precision explainer on the probe images; warn past the tolerance."""
    tolerance = TOLERANCES[precision]
    drifts = measure(explainer, probe_images(image_size), precision)
    beyond = [d for d in drifts if not d.within(tolerance)]
    if beyond:
        warnings.warn(
            f"--precision {precision}: the maps drift from float32 past the tolerance (max {tolerance.heatmap_max}, "
            f"mean {tolerance.heatmap_mean}): {'; '.join(map(str, beyond))}. Check the maps, or export in float32.",
            PrecisionWarning,
            stacklevel=2,
        )
    return drifts
