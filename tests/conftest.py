"""Shared, session-scoped exports: exporting costs seconds, so each model is exported once."""

from __future__ import annotations

import os
import pathlib
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import synthetic  # noqa: E402 (needs the tests folder on sys.path)


@pytest.fixture(scope="session")
def models_dir(tmp_path_factory) -> pathlib.Path:
    return tmp_path_factory.mktemp("models")


def _application_export(models_dir, name, methods):
    """Build `name` with random weights here, export it from its saved weights file.

    The test keeps the Keras model, so references computed eagerly in the test use exactly the
    weights the SavedModel was built from (and the weights-file path of the exporter is used).
    """
    import keras

    from export.savedmodel import export_savedmodel

    keras.utils.set_random_seed(1)
    constructor = {"resnet50": keras.applications.ResNet50, "vgg16": keras.applications.VGG16}[name]
    model = constructor(weights=None, classifier_activation=None)
    weights = models_dir / f"{name}.weights.h5"
    model.save_weights(weights)
    path = export_savedmodel(
        name, str(weights), methods, f"{name}_test", str(models_dir), warmup_batch_sizes=(1, 2), log=synthetic.quiet
    )
    return model, path


@pytest.fixture(scope="session")
def resnet50(models_dir):
    """(keras model with random weights, exported SavedModel dir) with gradcam and cam."""
    return _application_export(models_dir, "resnet50", ["gradcam", "cam"])


@pytest.fixture(scope="session")
def vgg16(models_dir):
    """VGG16 (ReLUs in its dense head too) with gradcam and guided_gradcam."""
    return _application_export(models_dir, "vgg16", ["gradcam", "guided_gradcam"])


@pytest.fixture(scope="session")
def shapes_model(tmp_path_factory) -> pathlib.Path:
    """The synthetic-shapes GAP CNN, trained once per session (fixed seed), as a .keras file."""
    path = tmp_path_factory.mktemp("shapes") / "shapes.keras"
    accuracy = synthetic.train_model(str(path))
    assert accuracy > 0.9, f"the synthetic model did not learn (held-out accuracy {accuracy:.2f})"
    return path


@pytest.fixture(scope="session")
def shapes_export(shapes_model, models_dir) -> pathlib.Path:
    """The shapes model exported with every method and top-2 maps: small and fast, for serving tests too."""
    from export.methods import METHODS
    from export.savedmodel import export_savedmodel

    return export_savedmodel(
        str(shapes_model), "none", list(METHODS), "shapes", str(models_dir), top_k_maps=2, log=synthetic.quiet
    )


@pytest.fixture(scope="session")
def transfer_export(models_dir):
    """kind -> (Keras model, exported dir, export notes) of a MobileNetV2 nested in a new model
    (synthetic.transfer_model), exported once per kind with gradcam and cam."""
    from export.savedmodel import export_savedmodel

    cache = {}

    def export(kind: str):
        if kind not in cache:
            model = synthetic.transfer_model(kind)
            path = models_dir / f"transfer_{kind}.keras"
            model.save(path)
            notes = []
            model_dir = export_savedmodel(str(path), "none", ["gradcam", "cam"], f"transfer_{kind}", str(models_dir),
                                          warmup_batch_sizes=(1,), feature_maps=0, log=notes.append)
            cache[kind] = model, model_dir, notes
        return cache[kind]

    return export


@pytest.fixture(scope="session")
def fused_export(shapes_model, models_dir) -> pathlib.Path:
    """The shapes model with maps fused over conv2 (32x32) and last_conv (16x16): layercam_fused, gradcam_fused."""
    from export.savedmodel import export_savedmodel

    return export_savedmodel(
        str(shapes_model), "none", ["layercam", "gradcam"], "fused", str(models_dir), target_layers=["last_conv", "conv2"],
        warmup_batch_sizes=(1, 2), feature_maps=0, log=synthetic.quiet,
    )


@pytest.fixture(scope="session")
def jit_export(shapes_model, models_dir) -> pathlib.Path:
    """The shapes model exported with --jit-compile (gradcam, eigencam, top-2 maps)."""
    from export.savedmodel import export_savedmodel

    return export_savedmodel(
        str(shapes_model), "none", ["gradcam", "eigencam"], "jit", str(models_dir), jit_compile=True,
        top_k_maps=2, warmup_batch_sizes=(1,), feature_maps=0, log=synthetic.quiet,
    )


@pytest.fixture(scope="session")
def load():
    """Load a SavedModel once per path."""
    import tensorflow as tf

    cache = {}

    def loader(path):
        if path not in cache:
            cache[path] = tf.saved_model.load(str(path))
        return cache[path]

    return loader
