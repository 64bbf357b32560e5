"""A small GAP CNN trained on synthetic images whose answer is known: where the object is.

Each 64x64 image is noise with one shape (filled square, cross or ring, the class) at a random
place; the shape's bounding box is the ground truth for the pointing game.
"""

from __future__ import annotations

import pathlib

import numpy as np

SIZE = 64
SHAPES = ("square", "cross", "ring")
TINY_SIZE, TINY_CLASSES = 32, 4  # the tiny GAP CNN the serving tests serve
TINY_MAX_BATCH = 8  # the request limit of its export for the hostile-input and load tests (tiny_gradcam_model)


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


def train_model(path: str, seed: int = 0, epochs: int = 6) -> float:
    """Train a small GAP + dense CNN, save it as `path` (.keras); returns held-out accuracy."""
    import keras

    keras.utils.set_random_seed(seed)
    images, labels, _ = dataset(3000, seed)
    inputs = keras.Input((SIZE, SIZE, 3))
    x = keras.layers.Rescaling(1 / 255.0)(inputs)
    for i, filters in enumerate((16, 32), start=1):
        x = keras.layers.Conv2D(filters, 3, padding="same", activation="relu", name=f"conv{i}")(x)
        x = keras.layers.MaxPooling2D()(x)
    x = keras.layers.Conv2D(64, 3, padding="same", activation="relu", name="last_conv")(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    outputs = keras.layers.Dense(len(SHAPES), activation="softmax", name="predictions")(x)
    model = keras.Model(inputs, outputs, name="shapes")
    model.compile(optimizer=keras.optimizers.Adam(3e-3), loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    model.fit(images, labels, epochs=epochs, batch_size=64, verbose=0)
    model.save(path)
    test_images, test_labels, _ = dataset(300, seed + 1)
    return float(model.evaluate(test_images, test_labels, verbose=0)[1])


def vit(head: str = "class", dim: int = 32, heads: int = 4, blocks: int = 2):
    """A small ViT on 8x8 patches with pre-norm blocks named block1.., uncompiled. `head`: "class" (a class
    token, the head on it: ViT, DeiT) or "mean" (no class token, the head on the mean of the patch tokens:
    the simple ViT of Beyer et al. 2022). Only stock layers, so it loads without custom objects: the class
    token and the position embeddings are the biases of Dense layers fed zeros (Rescaling(0)), and
    Cropping1D takes token 0 out for the head."""
    import keras

    patches = (SIZE // 8) ** 2
    tokens = patches + (head == "class")
    inputs = keras.Input((SIZE, SIZE, 3))
    x = keras.layers.Rescaling(1 / 255.0)(inputs)
    x = keras.layers.Conv2D(dim, 8, strides=8, name="patch_embedding")(x)
    x = keras.layers.Reshape((patches, dim))(x)
    zeros = keras.layers.Rescaling(0.0, name="zeros")(keras.layers.GlobalAveragePooling2D()(inputs))
    if head == "class":
        cls = keras.layers.Dense(dim, kernel_initializer="zeros", name="class_token")(zeros)
        x = keras.layers.Concatenate(axis=1)([keras.layers.Reshape((1, dim))(cls), x])
    positions = keras.layers.Dense(tokens * dim, kernel_initializer="zeros", name="position_embedding",
                                   bias_initializer=keras.initializers.RandomNormal(stddev=0.02))(zeros)
    x = keras.layers.Add()([x, keras.layers.Reshape((tokens, dim))(positions)])
    for i in range(1, blocks + 1):
        y = keras.layers.LayerNormalization(epsilon=1e-6, name=f"block{i}_norm1")(x)
        y = keras.layers.MultiHeadAttention(heads, dim // heads, name=f"block{i}_attention")(y, y)
        x = keras.layers.Add(name=f"block{i}_add1")([x, y])
        y = keras.layers.LayerNormalization(epsilon=1e-6, name=f"block{i}_norm2")(x)
        y = keras.layers.Dense(2 * dim, activation="gelu", name=f"block{i}_mlp1")(y)
        y = keras.layers.Dense(dim, name=f"block{i}_mlp2")(y)
        x = keras.layers.Add(name=f"block{i}_output")([x, y])
    x = keras.layers.LayerNormalization(epsilon=1e-6, name="encoder_norm")(x)
    if head == "class":
        x = keras.layers.Flatten()(keras.layers.Cropping1D((0, patches), name="class_output")(x))
    else:
        x = keras.layers.GlobalAveragePooling1D(name="token_pooling")(x)
    outputs = keras.layers.Dense(len(SHAPES), activation="softmax", name="predictions")(x)
    return keras.Model(inputs, outputs, name=f"shapes_vit_{head}")


def train_vit(path: str, head: str = "class", seed: int = 0, epochs: int = 8) -> float:
    """Train `vit(head)` on the shapes, save it as `path` (.keras); returns held-out accuracy. Transformers
    learn slowly from few images, hence twice `train_model`'s data."""
    import keras

    keras.utils.set_random_seed(seed)
    images, labels, _ = dataset(6000, seed)
    model = vit(head)
    model.compile(optimizer=keras.optimizers.Adam(1e-3), loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    model.fit(images, labels, epochs=epochs, batch_size=64, verbose=0)
    model.save(path)
    test_images, test_labels, _ = dataset(300, seed + 1)
    return float(model.evaluate(test_images, test_labels, verbose=0)[1])


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
    from camserve.export.savedmodel import export_savedmodel

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
    them: `sequential` or `functional` (with rescaling and dropout around the base)."""
    import keras

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
