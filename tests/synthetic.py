"""Synthetic images whose answer is known, where the object is, and the tests' small models and export helpers.

Each 64x64 image is noise with one shape (filled square, cross or ring, the class) at a random
place; the shape's bounding box is the ground truth for the pointing game. The models trained on them
are files in testdata/, made by testdata/make_testdata.py, so every machine tests the same weights.
"""

from __future__ import annotations

import pathlib

import numpy as np

SIZE = 64
SHAPES = ("square", "cross", "ring")
TINY_SIZE, TINY_CLASSES = 32, 4  # the tiny GAP CNN the serving tests serve
TINY_MAX_BATCH = 8  # the request limit of its export for the hostile-input and load tests (tiny_gradcam_model)
TESTDATA = pathlib.Path(__file__).parent / "testdata"  # trained models: make_testdata.py there makes them


def draw(shape: str, rng: np.random.Generator) -> tuple[np.ndarray, tuple[int, int, int, int]]:
    """One uint8 RGB image and the object's box (top, left, bottom, right), exclusive ends."""
    image = rng.integers(0, 96, size=(SIZE, SIZE, 3)).astype(np.uint8)
    side = int(rng.integers(14, 20))
    top, left = (int(v) for v in rng.integers(0, SIZE - side, size=2))
    yy, xx = np.mgrid[:side, :side]
    centre = (side - 1) / 2
    if shape == "square":
        mask = np.ones((side, side), bool)
    elif shape == "cross":
        third = side // 3
        mask = (abs(yy - centre) < third / 2 + 1) | (abs(xx - centre) < third / 2 + 1)
    else:
        radius = np.hypot(yy - centre, xx - centre)
        mask = (radius < side / 2) & (radius > side / 2 - 4)
    colour = rng.integers(170, 256, size=3).astype(np.uint8)
    image[top : top + side, left : left + side][mask] = colour
    return image, (top, left, top + side, left + side)


def dataset(count: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(images uint8 [n,64,64,3], labels int [n], boxes int [n,4])."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, len(SHAPES), size=count)
    images, boxes = zip(*(draw(SHAPES[label], rng) for label in labels))
    return np.stack(images), labels, np.array(boxes)


def pointing_hits(heatmaps: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    """Whether each heatmap's peak falls inside the object's box."""
    flat = heatmaps.reshape(len(heatmaps), -1).argmax(axis=1)
    rows, cols = np.unravel_index(flat, heatmaps.shape[1:])
    top, left, bottom, right = boxes.T
    return (rows >= top) & (rows < bottom) & (cols >= left) & (cols < right)


def quiet(message: str) -> None:
    """A `log` for export_savedmodel that keeps the tests' output clean."""


def tiny_gap_cnn(path, size: int, classes: int, seed: int, filters: int = 8, softmax: bool = True) -> None:
    """An untrained one-conv GAP + dense CNN saved as `path` (.keras): the cheapest model to serve."""
    import keras

    keras.utils.set_random_seed(seed)
    inputs = keras.Input((size, size, 3))
    x = keras.layers.Rescaling(1 / 255.0)(inputs)
    x = keras.layers.Conv2D(filters, 3, strides=2, padding="same", activation="relu", name="last_conv")(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    outputs = keras.layers.Dense(classes, activation="softmax" if softmax else None)(x)
    keras.Model(inputs, outputs).save(path)


def export_model(backbone, methods, model_name: str, base_path, weights: str = "none", log=quiet,
                 **options) -> pathlib.Path:
    """`export_savedmodel` as the tests call it: random weights unless given, no log; returns the version directory."""
    from camserve.export.pipeline import export_savedmodel

    return export_savedmodel(backbone=str(backbone), weights=weights, methods=list(methods), model_name=model_name,
                             base_path=str(base_path), log=log, **options)


def export_tiny(base: pathlib.Path, version: int = 1, methods=("gradcam", "cam"), seed: int = 3,
                classes: int = TINY_CLASSES, **options) -> pathlib.Path:
    """The tiny GAP CNN (random weights of `seed`) exported as `base`/<version>; returns that directory."""
    keras_file = base.parent / f"{base.name}_{seed}_{classes}.keras"
    if not keras_file.exists():
        tiny_gap_cnn(keras_file, TINY_SIZE, classes, seed=seed)
    options = {"warmup_batch_sizes": (1,), "feature_maps": 0, **options}
    return export_model(keras_file, methods, base.name, base.parent, version=version, **options)


def transfer_model(kind: str):
    """A keras.applications base (MobileNetV2) nested in a new model with a new head, as users build
    them: `sequential` or `functional` (with rescaling and dropout around the base); seeded, so that every
    run and machine starts from the same weights."""
    import keras

    keras.utils.set_random_seed(11)
    base = keras.applications.MobileNetV2(weights=None, include_top=False, input_shape=(64, 64, 3))
    if kind == "sequential":
        return keras.Sequential(
            [keras.Input((64, 64, 3)), base, keras.layers.GlobalAveragePooling2D(),
             keras.layers.Dense(3, activation="softmax")]
        )
    inputs = keras.Input((64, 64, 3))
    x = keras.layers.Rescaling(1 / 127.5, offset=-1)(inputs)
    x = base(x, training=False)
    x = keras.layers.GlobalAveragePooling2D()(x)
    x = keras.layers.Dropout(0.2)(x)
    return keras.Model(inputs, keras.layers.Dense(3, activation="softmax")(x))
