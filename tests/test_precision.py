"""--precision bfloat16 / float16: the layers compute in that type, the explanation stays float32.

Each reduced-precision export is compared with the float32 export of the same weights, both run through
TF Serving's loader (LoadSavedModel + Session::Run), on 100 held-out synthetic images: the heatmap
differences must stay within the published tolerances (export/precision.py, docs/DEPLOYING.md
"Reduced precision in detail"), the top-1 class must agree, and the pointing game must still be won.
"""

from __future__ import annotations

import json
import pathlib
import warnings

import numpy as np
import pytest
from tensorflow.core.framework import types_pb2
from tensorflow.core.protobuf import saved_model_pb2

import synthetic
from calls import run_method
from camserve.export.methods import METHODS
from camserve.export.precision import TOLERANCES, PrecisionWarning
from camserve.serving.servables.session import SavedModelSession

pytestmark = pytest.mark.slow  # two exports of every method, at bfloat16 and float16

ROOT = pathlib.Path(__file__).resolve().parent.parent
PRECISIONS = ("bfloat16", "float16")
TYPES = {"bfloat16": types_pb2.DT_BFLOAT16, "float16": types_pb2.DT_HALF}


@pytest.fixture(scope="session")
def precision_exports(shapes_model, build_once):
    """precision -> (exported dir, messages of the warnings the export raised): the shapes model with
    every method, exported once per run (whichever test process asks first)."""

    def build(folder: pathlib.Path) -> None:
        raised = {}
        for precision in PRECISIONS:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always", PrecisionWarning)
                synthetic.export_model(shapes_model, list(METHODS), f"shapes_{precision}", folder,
                                       precision=precision, warmup_batch_sizes=(1, 2), feature_maps=0)
            raised[precision] = [str(w.message) for w in caught if issubclass(w.category, PrecisionWarning)]
        (folder / "warnings.json").write_text(json.dumps(raised))

    folder = build_once("precision_exports", build)
    raised = json.loads((folder / "warnings.json").read_text())
    return {precision: (folder / f"shapes_{precision}" / "1", raised[precision]) for precision in PRECISIONS}


def _heatmaps(session: SavedModelSession, method: str, images: np.ndarray, labels: np.ndarray) -> dict[str, np.ndarray]:
    return run_method(session, method, {"images": images, "class_index": labels.astype(np.int32)},
                      ["heatmap", "logits", "probabilities"])


HELD_OUT = synthetic.dataset(100, seed=99)  # images, labels, boxes


@pytest.fixture(scope="module")
def float32_outputs(shapes_export) -> dict[str, dict[str, np.ndarray]]:
    """method -> the float32 export's outputs on the held-out images, computed once for both precisions."""
    images, labels, _ = HELD_OUT
    with SavedModelSession(shapes_export) as reference:
        return {method: _heatmaps(reference, method, images, labels) for method in METHODS}


@pytest.mark.parametrize("precision", PRECISIONS)
def test_reduced_precision_stays_within_the_published_tolerance(precision_exports, float32_outputs, precision):
    images, labels, boxes = HELD_OUT
    path, raised = precision_exports[precision]
    tolerance = TOLERANCES[precision]
    assert not raised, raised  # the exporter's own check agreed
    with SavedModelSession(path) as reduced:
        for method in METHODS:
            expected = float32_outputs[method]
            got = _heatmaps(reduced, method, images, labels)
            for name in ("heatmap", "logits", "probabilities"):  # the signature contract: float32 on the wire
                assert got[name].dtype == np.float32 and got[name].shape == expected[name].shape
            diff = np.abs(got["heatmap"].astype(np.float64) - expected["heatmap"])
            top1 = np.mean(got["logits"].argmax(1) == expected["logits"].argmax(1))
            hits, hits32 = (synthetic.pointing_hits(m["heatmap"], boxes).mean() for m in (got, expected))
            print(
                f"{precision} {method:15s} heatmap max {diff.max():.4f} mean {diff.mean():.5f} "
                f"top-1 agreement {top1:.0%} pointing {hits:.0%} (float32 {hits32:.0%})"
            )
            assert diff.max() <= tolerance.heatmap_max, method
            assert diff.mean() <= tolerance.heatmap_mean, method
            assert top1 >= 0.99, method
            assert hits >= 0.9 and abs(hits - hits32) <= 0.02, method
            # Reduced precision does change the numbers: the comparison is not of two float32 graphs.
            assert np.abs(got["logits"] - expected["logits"]).max() > 1e-6


@pytest.mark.parametrize("precision", PRECISIONS)
def test_layers_compute_in_the_reduced_type_and_variables_stay_float32(precision_exports, precision):
    import tensorflow as tf

    path, _ = precision_exports[precision]
    saved = saved_model_pb2.SavedModel.FromString((path / "saved_model.pb").read_bytes())
    graph = saved.meta_graphs[0].graph_def
    convolutions = [n for f in graph.library.function for n in f.node_def if n.op == "Conv2D"]
    assert convolutions and all(n.attr["T"].type == TYPES[precision] for n in convolutions)
    dtypes = tf.train.load_checkpoint(str(path / "variables" / "variables")).get_variable_to_dtype_map()
    variables = {name: dtype for name, dtype in dtypes.items() if "/.ATTRIBUTES/VARIABLE_VALUE" in name}
    assert variables and set(variables.values()) == {tf.float32}


def _cancellation_model(path) -> None:
    """A map made of the difference of two large activations: A_0 = 1000 + brightness, A_1 = 1000.
    In float32 the map is the image's brightness; bfloat16 (4 apart near 1000) rounds it away."""
    import keras

    inputs = keras.Input((16, 16, 3))
    conv = keras.layers.Conv2D(2, 1, name="conv")
    dense = keras.layers.Dense(2, name="predictions")
    model = keras.Model(inputs, dense(keras.layers.GlobalAveragePooling2D()(conv(inputs))))
    kernel = np.zeros((1, 1, 3, 2), np.float32)
    kernel[..., 0] = 1 / (3 * 255)
    conv.set_weights([kernel, np.full(2, 1000, np.float32)])
    dense.set_weights([np.array([[1, -1], [-1, 1]], np.float32), np.zeros(2, np.float32)])
    model.save(path)


def test_the_exporter_warns_when_the_maps_drift(models_dir, tmp_path):

    path = tmp_path / "cancellation.keras"
    _cancellation_model(path)
    log: list[str] = []
    with pytest.warns(PrecisionWarning, match=r"--precision bfloat16: the maps drift .* gradcam: heatmap max"):
        synthetic.export_model(path, ["gradcam"], "cancellation", models_dir, precision="bfloat16",
                               warmup_batch_sizes=(1,), feature_maps=0, log=log.append)
    assert any("bfloat16 maps vs float32" in line for line in log)
    with warnings.catch_warnings():
        warnings.simplefilter("error", PrecisionWarning)  # float32 is not checked, so it cannot warn
        synthetic.export_model(path, ["gradcam"], "cancellation", models_dir, warmup_batch_sizes=(1,), feature_maps=0)


@pytest.mark.real
def test_batch_normalised_nested_backbone_in_bfloat16(models_dir, tmp_path):
    """MobileNetV2 (batch normalisation, depthwise convolutions, ReLU6) nested in a transfer model. Not float16:
    with random weights its activations shrink to ~1e-11, below float16's range, and the exporter warns (rightly)."""
    import keras

    # Seeded: random weights are not trained ones, and some draws drift past bfloat16's tolerance
    # (seeds 0-3 drift 0.009-0.033; an unseeded draw once gave 0.14), which the exporter rightly reports.
    keras.utils.set_random_seed(0)
    path = tmp_path / "transfer.keras"
    synthetic.transfer_model("functional").save(path)
    log: list[str] = []
    with warnings.catch_warnings():
        warnings.simplefilter("error", PrecisionWarning)
        synthetic.export_model(path, ["gradcam", "cam"], "transfer_bfloat16", models_dir, precision="bfloat16",
                               warmup_batch_sizes=(1,), feature_maps=0, log=log.append)
    assert any("verified with TensorFlow Serving's loader" in line for line in log)
    assert sum("heatmap max" in line for line in log) == 2


def test_the_cli_passes_the_precision_and_refuses_others(monkeypatch, capsys):
    import camserve.export.pipeline as pipeline
    from camserve.export.__main__ import main

    calls = []
    monkeypatch.setattr(pipeline, "export_savedmodel", calls.append)
    assert main(["--backbone", "resnet50", "--model-name", "m", "--precision", "bfloat16"]) == 0
    assert calls[0].precision == "bfloat16"
    assert main(["--backbone", "resnet50", "--model-name", "m"]) == 0
    assert calls[1].precision == "float32"
    with pytest.raises(SystemExit) as exit_info:
        main(["--backbone", "resnet50", "--model-name", "m", "--precision", "float8"])
    assert exit_info.value.code == 2 and "invalid choice: 'float8'" in capsys.readouterr().err


def test_the_probes_are_the_sample_photos_shipped_in_the_package(tmp_path, monkeypatch):
    """Installed, the repository's samples/ is not there: the drift check reads its own copies of the
    photos (package data), and refuses to run on noise alone when they are missing."""
    import tensorflow as tf

    from camserve.export import precision

    assert precision.PROBES.is_relative_to(pathlib.Path(precision.__file__).parent)
    samples = sorted(p for p in (ROOT / "samples").iterdir() if p.suffix in (".png", ".jpg"))
    probes = precision.probe_images((32, 48), noise=1)
    assert probes.shape == (len(samples) + 1, 32, 48, 3) and probes.dtype == np.uint8
    for probe, sample in zip(probes, samples):  # resized copies: ~2-5 grey levels apart, other photos ~60
        photo = tf.image.resize(tf.image.decode_image(sample.read_bytes(), channels=3), (32, 48)).numpy()
        assert np.abs(probe - photo).mean() < 10, sample.name
    monkeypatch.setattr(precision, "PROBES", tmp_path)
    with pytest.raises(FileNotFoundError, match="no probe images in"):
        precision.probe_images((32, 48))


def test_the_drift_check_does_not_depend_on_the_signatures_being_built(tmp_path):
    """The signatures run shared functions traced once; the drift check traces its own passes under each
    dtype policy, so it measures the same drift before and after the signatures are built."""
    from camserve.export.backbone import load_backbone
    from camserve.export.explainer import Explainer
    from camserve.export.methods import get_method
    from camserve.export.precision import measure, probe_images
    from camserve.export.signatures import build_signatures

    synthetic.tiny_gap_cnn(tmp_path / "tiny.keras", synthetic.TINY_SIZE, synthetic.TINY_CLASSES, seed=3)
    split = load_backbone(str(tmp_path / "tiny.keras"), "none", precision="bfloat16")
    explainer = Explainer(split, [get_method("gradcam")])
    images = probe_images(split.image_size)
    before = measure(explainer, images, "bfloat16")
    build_signatures(explainer, [f"class_{i}" for i in range(synthetic.TINY_CLASSES)], max_batch_size=8,
                     max_image_pixels=10**6)
    assert measure(explainer, images, "bfloat16") == before
    assert before[0].heatmap_max > 0  # bfloat16 does move the maps: the two runs were traced apart
