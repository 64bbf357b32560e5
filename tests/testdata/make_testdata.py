"""Makes the models in this folder, which the tests load instead of training: `python tests/testdata/make_testdata.py`.

A model trained during the run would be a different model on every machine (its weights follow the
machine's floating-point kernels), and so would the verdicts of the tests that look at its maps. The files:

- shapes.keras: the synthetic-shapes GAP CNN (`shapes_cnn`; seed 0, 6 epochs on 3000 images), the
  `shapes_model` fixture of tests/conftest.py;
- vit_class.keras: `vit("class")`, a class-token ViT (seed 0, 8 epochs on 6000 images), and
- vit_mean.keras: `vit("mean")`, untrained (random weights of seed 4), the `vits` of tests/test_transformers.py.

A trained model must score over 90 % held-out accuracy (read back from its file), or nothing is written. The files
hold the weights and the architecture, not the optimizer's state: the tests only run the models.
"""

from __future__ import annotations

import pathlib
import sys

HERE = pathlib.Path(__file__).resolve().parent
MIN_ACCURACY = 0.9


def shapes_cnn():
    """A small GAP + dense CNN for the shapes: conv1, conv2 (32x32), last_conv (16x16), GAP, predictions."""
    import keras

    from synthetic import SHAPES, SIZE

    inputs = keras.Input((SIZE, SIZE, 3))
    x = keras.layers.Rescaling(1 / 255.0)(inputs)
    for i, filters in enumerate((16, 32), start=1):
        x = keras.layers.Conv2D(filters, 3, padding="same", activation="relu", name=f"conv{i}")(x)
        x = keras.layers.MaxPooling2D()(x)
    x = keras.layers.Conv2D(64, 3, padding="same", activation="relu", name="last_conv")(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    outputs = keras.layers.Dense(len(SHAPES), activation="softmax", name="predictions")(x)
    return keras.Model(inputs, outputs, name="shapes")


def vit(head: str = "class", dim: int = 32, heads: int = 4, blocks: int = 2):
    """A small ViT on 8x8 patches with pre-norm blocks named block1.., uncompiled. `head`: "class" (a class
    token, the head on it: ViT, DeiT) or "mean" (no class token, the head on the mean of the patch tokens:
    the simple ViT of Beyer et al. 2022). Only stock layers, so it loads without custom objects: the class
    token and the position embeddings are the biases of Dense layers fed zeros (Rescaling(0)), and
    Cropping1D takes token 0 out for the head."""
    import keras

    from synthetic import SHAPES, SIZE

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


def trained(build, count: int, epochs: int, learning_rate: float, seed: int = 0):
    """`build()` trained on `count` synthetic images of `seed`, as an uncompiled model (no optimizer state).
    Transformers learn slowly from few images: the ViT gets twice the CNN's data."""
    import keras

    from synthetic import dataset

    keras.utils.set_random_seed(seed)
    images, labels, _ = dataset(count, seed)
    model = build()
    model.compile(optimizer=keras.optimizers.Adam(learning_rate), loss="sparse_categorical_crossentropy")
    model.fit(images, labels, epochs=epochs, batch_size=64, verbose=0)
    weights = model.get_weights()
    keras.backend.clear_session()  # the same layer names again
    plain = build()
    plain.set_weights(weights)
    return plain


def untrained(build, seed: int):
    """`build()` with the random weights of `seed`."""
    import keras

    keras.utils.set_random_seed(seed)
    return build()


def held_out_accuracy(path: pathlib.Path, seed: int = 1) -> float:
    """The accuracy of the saved file on 300 images none was trained on."""
    import keras
    import numpy as np

    from synthetic import dataset

    images, labels, _ = dataset(300, seed)
    probabilities = keras.models.load_model(path).predict(images, verbose=0)
    return float((np.argmax(probabilities, axis=1) == labels).mean())


def main() -> int:
    import keras

    sys.path.insert(0, str(HERE.parent))  # tests/: synthetic.py
    models = {  # file -> (how it is made, whether it is trained)
        "shapes.keras": (lambda: trained(shapes_cnn, 3000, epochs=6, learning_rate=3e-3), True),
        "vit_class.keras": (lambda: trained(lambda: vit("class"), 6000, epochs=8, learning_rate=1e-3), True),
        "vit_mean.keras": (lambda: untrained(lambda: vit("mean"), seed=4), False),
    }
    staged = {}
    for name, (make, is_trained) in models.items():
        keras.backend.clear_session()  # layer names as in a fresh process, whatever was built before
        staged[name] = HERE / f".{name}"  # written beside the file, renamed over it once every check passed
        make().save(staged[name])
        if is_trained:
            accuracy = held_out_accuracy(staged[name])
            print(f"{name}: held-out accuracy {accuracy:.3f}")
            if accuracy <= MIN_ACCURACY:
                print(f"{name} did not learn (held-out accuracy {accuracy:.2f}): nothing written",
                      file=sys.stderr)
                for path in staged.values():
                    path.unlink()
                return 1
    for name, path in staged.items():
        path.replace(HERE / name)
        print(f"wrote {HERE / name} ({(HERE / name).stat().st_size} bytes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
