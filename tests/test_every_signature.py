"""Every signature of every model the suite exports, each alone and for every output, through TensorFlow
Serving's loader (LoadSavedModel + Session::Run, serving/servables/session.py) against the TF2 path.

The exporter's own check runs only what a server runs at start (the warm-up and the aliases of warmed
signatures: export/verify.py); the views (a method's own signatures, predict, feature_maps) and the other
aliases build their executors at their first call, and are run here. `make test-quick` leaves this out
(the `slow` marker): one executor build per signature.
"""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf

from camserve.client.outputs import EXPLAIN_SIGNATURE, METHOD_INPUT, PREDICT, VARIANT_SUFFIXES, explained_methods
from camserve.serving.servables.session import SavedModelSession
from camserve.serving.servables.session_config import session_config
from camserve.serving.servables.warmup import read_warmup_requests
from test_tfserving_loader import FLOAT_ATOL

pytestmark = pytest.mark.slow

EXPORTS = {
    "resnet50": lambda request: request.getfixturevalue("resnet50")[1],
    "vgg16": lambda request: request.getfixturevalue("vgg16")[1],
    "nested_mobilenet_v2": lambda request: request.getfixturevalue("transfer_export")("functional")[1],
    "shapes_all_methods": lambda request: request.getfixturevalue("shapes_export"),
    "shapes_jit_compile": lambda request: request.getfixturevalue("jit_export"),
    "shapes_fused_layers": lambda request: request.getfixturevalue("fused_export"),
}


def assert_same(name: str, served: np.ndarray, expected: np.ndarray) -> float:
    """Assert one output agrees; returns its largest absolute difference (0 for strings)."""
    assert served.shape == expected.shape and served.dtype == expected.dtype, name
    if served.dtype == object:
        if not name.endswith("_png_bytes"):  # PNG bytes follow heatmap_uint8, compared by value
            assert served.tolist() == expected.tolist(), name
        return 0.0
    diff = float(np.max(np.abs(served.astype(np.float64) - expected.astype(np.float64)), initial=0.0))
    limit = FLOAT_ATOL if served.dtype.kind == "f" else (1 if served.dtype == np.uint8 else 0)
    assert diff <= limit, f"{name}: differs by {diff}"
    return diff


def inputs_like(record: dict[str, np.ndarray], name: str, names, defs) -> dict[str, np.ndarray]:
    """A signature's inputs made from a warm-up record's (image_bytes, class_index, method): its first
    image decoded where it takes `images`; one row per method of its family where it takes a method
    (the warm-up leaves Score-CAM out), else the record's rows."""
    if METHOD_INPUT in names:
        variant = next((s for s in VARIANT_SUFFIXES if name.startswith(EXPLAIN_SIGNATURE + s)), "")
        family = f"{EXPLAIN_SIGNATURE}{variant}_bytes"
        rows = [row for signature, row in explained_methods(defs).values() if signature == family] + [PREDICT]
        record = {"image_bytes": record["image_bytes"][:1].repeat(len(rows)),
                  "class_index": np.full(len(rows), -1, np.int32), METHOD_INPUT: np.array(rows, dtype=object)}
    given = {**record, "images": np.stack([tf.io.decode_image(b, channels=3).numpy() for b in record["image_bytes"]])}
    return {name: given[name] for name in names}


@pytest.mark.parametrize("model", [pytest.param(name, marks=[pytest.mark.real] if not name.startswith("shapes") else [])
                                   for name in EXPORTS])
def test_tf_serving_loader_runs_every_signature_like_the_tf2_path(request, load, model):
    path = EXPORTS[model](request)
    tf2 = load(path)
    replayed, largest = set(), 0.0
    with SavedModelSession(path, config=session_config()) as session:  # the settings of a server on this machine
        servable = set(session.signature_defs) - {"__saved_model_init_op"}
        assert servable == set(tf2.signatures)
        warmup = list(read_warmup_requests(path))  # what TF Serving replays before it serves the version
        # Then every signature, aliases and feature_maps included, for every output, on the image of the
        # first warm-up record (each family with every method and a prediction in its rows).
        defs = session.signature_defs
        first = {k: tf.make_ndarray(v) for k, v in warmup[0].inputs.items()}
        complete = [(name, inputs_like(first, name, defs[name].inputs, defs), ()) for name in sorted(servable)]
        for name, inputs, output_filter in [*((r.model_spec.signature_name, {k: tf.make_ndarray(v) for k, v in
                                                                             r.inputs.items()}, r.output_filter)
                                               for r in warmup), *complete]:
            served = session.run_signature(name, inputs, output_filter)
            expected = tf2.signatures[name](**{k: tf.constant(v) for k, v in inputs.items()})
            assert set(served) == set(output_filter or expected)
            for alias, value in served.items():
                largest = max(largest, assert_same(f"{name}.{alias}", value, expected[alias].numpy()))
            replayed.add(name)
    assert replayed == servable
    # The warm-up builds what our callers use by default: explain_bytes, and explain_fused_bytes for the
    # fused maps.
    assert {r.model_spec.signature_name for r in warmup} == {"explain_bytes"} | (
        {"explain_fused_bytes"} if "explain_fused_bytes" in servable else set())
    print(f"{model}: {len(replayed)} signatures, largest difference from the TF2 path {largest}")
