"""Shared, session-scoped exports: exporting costs seconds, so each model is exported once per run,
also when pytest-xdist runs the tests in several processes (`shared`)."""

from __future__ import annotations

import fcntl
import functools
import os
import pathlib
import shutil
from typing import Callable

import pytest

import synthetic  # the tests folder is on sys.path: pytest.ini's pythonpath

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

# Fixtures that export a real backbone (keras.applications architectures, EfficientNet-Lite0 with its
# weights): a test that asks for one is marked `real`, as are the modules and parameters that build such
# backbones themselves. `make test-quick` leaves them out; `make test` and CI run everything.
REAL_BACKBONES = {"resnet50", "vgg16", "lite0_export", "transfer_export"}


def pytest_collection_modifyitems(items) -> None:
    for item in items:
        if REAL_BACKBONES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.real)


def shared(tmp_path_factory, name: str, build: Callable[[pathlib.Path], object]) -> pathlib.Path:
    """A folder `build` fills once per run: under pytest-xdist the first worker that asks builds it
    while the others wait for it (a file lock in the run's temporary folder). Nobody changes it after."""
    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent  # the run's folder, above the workers' own
    folder = root / f"shared-{name}"
    with open(root / f"shared-{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (folder / ".built").exists():
            shutil.rmtree(folder, ignore_errors=True)
            folder.mkdir()
            build(folder)
            (folder / ".built").touch()
    return folder


@pytest.fixture(scope="session")
def build_once(tmp_path_factory) -> Callable[[str, Callable[[pathlib.Path], object]], pathlib.Path]:
    """`shared` for the test modules: build_once(name, build) -> the folder, built once per run."""
    return functools.partial(shared, tmp_path_factory)


@pytest.fixture(scope="session")
def models_dir(tmp_path_factory) -> pathlib.Path:
    return tmp_path_factory.mktemp("models")


def _application_export(tmp_path_factory, name, methods):
    """(Keras model, export) of `name` with random weights, exported from its saved weights file.

    The test keeps the Keras model, so references computed eagerly in the test use exactly the
    weights the SavedModel was built from (and the weights-file path of the exporter is used).
    """
    import keras

    keras.utils.set_random_seed(1)
    constructor = {"resnet50": keras.applications.ResNet50, "vgg16": keras.applications.VGG16}[name]
    model = constructor(weights=None, classifier_activation=None)

    def build(folder: pathlib.Path) -> None:
        model.save_weights(folder / "model.weights.h5")
        synthetic.export_model(name, methods, f"{name}_test", folder, weights=str(folder / "model.weights.h5"),
                               warmup_batch_sizes=(1, 2))

    folder = shared(tmp_path_factory, name, build)
    model.load_weights(folder / "model.weights.h5")  # the weights of the export, whoever made it
    return model, folder / f"{name}_test" / "1"


@pytest.fixture(scope="session")
def resnet50(tmp_path_factory):
    """(keras model with random weights, exported SavedModel dir) with gradcam and cam."""
    return _application_export(tmp_path_factory, "resnet50", ["gradcam", "cam"])


@pytest.fixture(scope="session")
def vgg16(tmp_path_factory):
    """VGG16 (ReLUs in its dense head too) with gradcam and guided_gradcam."""
    return _application_export(tmp_path_factory, "vgg16", ["gradcam", "guided_gradcam"])


@pytest.fixture(scope="session")
def shapes_model() -> pathlib.Path:
    """The synthetic-shapes GAP CNN as a .keras file, trained by tests/testdata/make_testdata.py: the same
    weights on every machine."""
    return synthetic.TESTDATA / "shapes.keras"


def _shared_export(tmp_path_factory, name: str, backbone, methods, **options) -> pathlib.Path:
    """synthetic.export_model(backbone, methods, name, <shared folder>, **options), once per run."""
    folder = shared(tmp_path_factory, name, lambda f: synthetic.export_model(backbone, methods, name, f, **options))
    return folder / name / "1"


@pytest.fixture(scope="session")
def shapes_export(shapes_model, tmp_path_factory) -> pathlib.Path:
    """The shapes model exported with every method and top-2 maps: small and fast, for serving tests too."""
    from camserve.export.methods import METHODS

    return _shared_export(tmp_path_factory, "shapes", shapes_model, list(METHODS), top_k_maps=2)


@pytest.fixture(scope="session")
def transfer_export(tmp_path_factory):
    """kind -> (Keras model, exported dir, export notes) of a MobileNetV2 nested in a new model
    (synthetic.transfer_model), exported once per kind with gradcam and cam."""
    cache = {}

    def build(kind: str, folder: pathlib.Path) -> None:
        synthetic.transfer_model(kind).save(folder / "model.keras")
        notes = []
        synthetic.export_model(folder / "model.keras", ["gradcam", "cam"], f"transfer_{kind}", folder,
                               warmup_batch_sizes=(1,), feature_maps=0, log=notes.append)
        (folder / "notes.txt").write_text("\n".join(notes))

    def export(kind: str):
        if kind not in cache:
            import keras

            folder = shared(tmp_path_factory, f"transfer_{kind}", lambda f: build(kind, f))
            model = keras.models.load_model(folder / "model.keras")  # the weights of the export
            cache[kind] = model, folder / f"transfer_{kind}" / "1", (folder / "notes.txt").read_text().splitlines()
        return cache[kind]

    return export


@pytest.fixture(scope="session")
def fused_export(shapes_model, tmp_path_factory) -> pathlib.Path:
    """The shapes model with maps fused over conv2 (32x32) and last_conv (16x16): layercam_fused, gradcam_fused."""
    return _shared_export(tmp_path_factory, "fused", shapes_model, ["layercam", "gradcam"],
                          target_layers=["last_conv", "conv2"], warmup_batch_sizes=(1, 2), feature_maps=0)


@pytest.fixture(scope="session")
def jit_export(shapes_model, tmp_path_factory) -> pathlib.Path:
    """The shapes model exported with --jit-compile (gradcam, eigencam, top-2 maps)."""
    return _shared_export(tmp_path_factory, "jit", shapes_model, ["gradcam", "eigencam"], jit_compile=True,
                          top_k_maps=2, warmup_batch_sizes=(1,), feature_maps=0)


@pytest.fixture(scope="session")
def tiny_gradcam_model(tmp_path_factory) -> pathlib.Path:
    """Base path of `rel`/1: the tiny GAP CNN (seed 5), gradcam only, at most TINY_MAX_BATCH images a
    request; the model of the hostile-input and load tests. Tests copy it before changing it."""
    folder = shared(tmp_path_factory, "rel", lambda f: synthetic.export_tiny(
        f / "rel", methods=("gradcam",), seed=5, max_batch_size=synthetic.TINY_MAX_BATCH))
    return folder / "rel"


@pytest.fixture(scope="session")
def tiny_gradcam_reference(tiny_gradcam_model):
    """In-process calls of rel's signatures through TF2's loader: what every served answer must equal."""
    from tf2 import TF2

    loaded = TF2(tiny_gradcam_model / "1")

    def call(signature: str, **inputs):
        return {k: v.numpy() for k, v in loaded.signatures[signature](**inputs).items()}

    return call


@pytest.fixture(scope="session")
def load():
    """Load a SavedModel once per path through TF2's loader, every signature callable by name (tests/tf2.py)."""
    from tf2 import TF2

    cache = {}

    def loader(path):
        if path not in cache:
            cache[path] = TF2(path)
        return cache[path]

    return loader


@pytest.fixture(scope="session")
def lite0_export(tmp_path_factory) -> pathlib.Path:
    """EfficientNet-Lite0 with its packaged ImageNet weights and every method: the real model of the
    real-photo tests (verified through TF Serving's loader by the export itself)."""
    from camserve.export.methods import METHODS

    return _shared_export(tmp_path_factory, "lite0", "efficientnet_lite0", list(METHODS), weights="imagenet",
                          warmup_batch_sizes=(1,), feature_maps=0)
