"""export.gpu_kernels on tiny SavedModels built to keep or to break the GPU path, and on a real export.

No GPU is needed: TensorFlow registers its GPU kernels in every wheel, and the check reads them.
"""

from __future__ import annotations

import pytest
import tensorflow as tf

from camserve.export.gpu_kernels import GpuPlacementError, check_saved_model

IMAGES = tf.TensorSpec([None, 8, 8, 3], tf.float32, name="images")


class Tiny(tf.Module):
    """Two 3x3 convolutions with their weights in variables, as a Keras model holds them."""

    def __init__(self):
        super().__init__()
        self.w1 = tf.Variable(tf.random.stateless_normal([3, 3, 3, 4], seed=[1, 2]))
        self.w2 = tf.Variable(tf.random.stateless_normal([3, 3, 4, 4], seed=[3, 4]))

    def first(self, x):
        return tf.nn.relu(tf.nn.conv2d(x, self.w1, 1, "SAME"))

    def second(self, x):
        return tf.nn.conv2d(x, self.w2, 1, "SAME")


def save(tmp_path, module: tf.Module, compute, spec=IMAGES) -> str:
    """`module` saved with `compute` as its serving_default signature."""
    module.compute = tf.function(compute, input_signature=[spec])
    path = str(tmp_path / "model")
    tf.saved_model.save(module, path, signatures={"serving_default": module.compute.get_concrete_function()})
    return path


def through_strings(x):
    return tf.strings.to_number(tf.strings.as_string(x))  # CPU-only both ways


def through_png(x):
    pixels = tf.cast(tf.clip_by_value(x, 0, 255), tf.uint8)[0]  # [H, W, 4]
    return tf.cast(tf.io.decode_png(tf.io.encode_png(pixels), channels=4), tf.float32)[tf.newaxis]


def test_conv_relu_passes(tmp_path):
    tiny = Tiny()
    report = check_saved_model(save(tmp_path, tiny, lambda x: {"out": tiny.first(x)}))
    signature = report.signatures["serving_default"]
    assert signature.gpu_ops > 0 and not signature.violations
    assert report.edge_ops == frozenset() and not report.jit_compiled
    assert str(report).startswith(f"GPU kernels: {report.gpu_ops} ops on the explanation paths of 1 signatures "
                                  f"(most: serving_default, {report.gpu_ops}), 0 CPU-only op types at the edges")


@pytest.mark.parametrize("planted, op", [(through_strings, "AsString"), (through_png, "EncodePng")],
                         ids=["string", "png"])
def test_cpu_op_between_gpu_ops_is_refused(tmp_path, planted, op):
    tiny = Tiny()
    path = save(tmp_path, tiny, lambda x: {"out": tiny.second(planted(tiny.first(x)))})
    with pytest.raises(GpuPlacementError, match=f"{op} .* sits between two GPU ops") as raised:
        check_saved_model(path)
    message = str(raised.value)
    assert "signature 'serving_default'" in message and "copies that tensor to the host" in message
    assert {v.op for v in raised.value.report.violations} >= {op}
    report = check_saved_model(path, strict=False)  # the same findings, without raising
    assert report.violations == raised.value.report.violations and str(report).endswith("violations")


@pytest.mark.parametrize("edge", [
    lambda y: {"heatmap": y, "text": tf.strings.as_string(y)},
    lambda y: {"png_bytes": tf.io.encode_png(tf.cast(y[0], tf.uint8))},
], ids=["string", "png"])
def test_cpu_op_after_the_last_gpu_op_passes(tmp_path, edge):
    tiny = Tiny()
    report = check_saved_model(save(tmp_path, tiny, lambda x: edge(tiny.second(tiny.first(x)))))
    assert report.edge_ops & {"AsString", "EncodePng"} and report.gpu_ops > 0


def test_round_trip_of_the_weights_is_refused(tmp_path):
    """A variable's value lives on the GPU: converting it on the CPU before the conv is a round trip too."""
    tiny = Tiny()
    path = save(tmp_path, tiny, lambda x: {"out": tf.nn.conv2d(x, through_strings(tiny.w1), 1, "SAME")})
    with pytest.raises(GpuPlacementError, match="read of variable ReadVariableOp"):
        check_saved_model(path)


def test_planted_op_is_found_inside_nested_functions(tmp_path):
    tiny = Tiny()
    inner = tf.function(through_strings)
    outer = tf.function(lambda y: tiny.second(inner(y)))
    path = save(tmp_path, tiny, lambda x: {"out": outer(tiny.first(x))})
    with pytest.raises(GpuPlacementError) as raised:
        check_saved_model(path)
    found = [v for v in raised.value.report.violations if v.op == "AsString"]
    assert found and len(found[0].function) >= 2 and "through_strings" in found[0].function[-1]
    assert found[0].where in str(raised.value)


@pytest.mark.parametrize("control_flow", [
    lambda y: tf.cond(tf.reduce_sum(y) > 0, lambda: through_strings(y), lambda: y),
    lambda y: tf.map_fn(through_strings, y),  # a While loop over TensorLists
], ids=["cond", "while"])
def test_planted_op_is_found_inside_control_flow(tmp_path, control_flow):
    tiny = Tiny()
    with pytest.raises(GpuPlacementError, match="AsString"):
        check_saved_model(save(tmp_path, tiny, lambda x: {"out": tiny.second(control_flow(tiny.first(x)))}))


class Jit(Tiny):
    """A CAM-like heatmap (activations times their gradient) with its numeric core compiled by XLA."""

    @tf.function(jit_compile=True, autograph=False)
    def core(self, x):
        return self.core_on(x, self.w1)

    @tf.function(jit_compile=True, autograph=False)
    def core_on(self, x, w1):
        with tf.GradientTape() as tape:
            activations = tf.nn.relu(tf.nn.conv2d(x, w1, 1, "SAME"))
            tape.watch(activations)
            score = tf.reduce_sum(self.second(activations))
        return tf.reduce_mean(tape.gradient(score, activations) * activations, axis=-1)


def test_jit_core_holding_the_explanation_passes(tmp_path):
    jit = Jit()
    report = check_saved_model(save(tmp_path, jit, lambda x: {"heatmap": jit.core(x)}))
    signature = report.signatures["serving_default"]
    assert report.jit_compiled and signature.variable_reads == 2 and not signature.jit_violations
    assert "the compiled core holds every variable read" in str(report)


@pytest.mark.parametrize("compute, op, reason", [
    (lambda jit, x: {"heatmap": jit.core_on(x, tf.identity(jit.w1))}, "ReadVariableOp", "reads a model variable"),
    (lambda jit, x: {"heatmap": jit.core(x) * 2.0}, "Mul", "between the model's variables and a float output"),
], ids=["variable-read", "gpu-op"])
def test_explanation_outside_the_jit_core_is_refused(tmp_path, compute, op, reason):
    jit = Jit()
    with pytest.raises(GpuPlacementError, match="outside the XLA-compiled core") as raised:
        check_saved_model(save(tmp_path, jit, lambda x: compute(jit, x)))
    assert [(v.op, reason in v.reason) for v in raised.value.report.violations] == [(op, True)]


def test_real_export_keeps_cpu_ops_at_the_edges(tiny_gradcam_model):
    """The exporter's graphs: request checks, the tf.data decoder, labels, PNGs and errors sit at the edges."""
    report = check_saved_model(tiny_gradcam_model / "1")
    assert report.signatures and all(s.gpu_ops > 0 for s in report.signatures.values())
    assert {"DecodeImage", "EncodePng", "ParallelMapDatasetV2", "StringFormat"} <= report.edge_ops
    assert not report.violations and not report.jit_compiled


def test_the_exporter_refuses_a_cpu_only_op_in_the_explanation(shapes_model, tmp_path, monkeypatch):
    """A string round trip planted between the raw map and its resize in our own explainer graph: the
    export fails on the GPU check and publishes no version."""
    import synthetic
    from camserve.export import explainer

    normalise = explainer.normalise
    monkeypatch.setattr(explainer, "normalise",
                        lambda raw: normalise(tf.strings.to_number(tf.strings.as_string(raw))))
    with pytest.raises(GpuPlacementError, match="AsString"):
        synthetic.export_model(shapes_model, ["gradcam"], "m", tmp_path, warmup_batch_sizes=(1,), feature_maps=0)
    assert not [p for p in (tmp_path / "m").iterdir() if p.name.isdigit()]
