"""Write the explainer as a versioned SavedModel that TensorFlow Serving can poll safely.

The model is saved to a hidden temporary directory beside the versions and renamed into
`<base>/<name>/<version>/` only when complete (TF Serving ignores non-numeric directories), with
warm-up requests in `assets.extra/` so that the first real request is not slow.
"""

from __future__ import annotations

import os
import pathlib
import shutil
import tempfile
import time
from typing import Callable, Sequence

import numpy as np
import tensorflow as tf

from export.backbone import load_backbone
from export.decode import DEFAULT_MAX_PIXELS
from export.explainer import Explainer
from export.guided import survey
from export.methods import get_method
from export.precision import check as check_precision
from export.tfs_loader import WARMUP_FILE
from export.verify import verify

IMAGENET_LABELS = pathlib.Path(__file__).parent / "data" / "imagenet_classes.txt"
PYTHON_CALLBACK_OPS = {"PyFunc", "PyFuncStateless", "EagerPyFunc", "NumpyFunction"}


def load_labels(path: str | None, num_classes: int) -> list[str]:
    """Class names from a file, the shipped ImageNet names for 1000 classes, else class_<i>."""
    if path:
        labels = pathlib.Path(path).read_text().splitlines()
    elif num_classes == 1000:
        labels = IMAGENET_LABELS.read_text().splitlines()
    else:
        labels = [f"class_{i}" for i in range(num_classes)]
    if len(labels) != num_classes:
        raise ValueError(f"{path}: {len(labels)} class names for a model with {num_classes} classes")
    return labels


def next_version(model_dir: pathlib.Path) -> int:
    versions = [int(p.name) for p in model_dir.glob("*") if p.name.isdigit()]
    return max(versions, default=0) + 1


def python_callback_ops(signature: tf.types.experimental.ConcreteFunction) -> set[str]:
    """Op types that would call back into Python (not servable by TF Serving) in a signature."""
    graph = signature.graph.as_graph_def()
    nodes = list(graph.node) + [n for f in graph.library.function for n in f.node_def]
    return {n.op for n in nodes} & PYTHON_CALLBACK_OPS


def track_captured_variables(explainer: Explainer, signatures: dict) -> None:
    """Make the saved object track every variable the signatures capture.

    TF Serving restores variables with the saver's restore op, which covers only the variables the
    saved object graph tracks. Keras 3 layers held by a tf.Module are not tracked that way, so
    their variables would exist in the graph but never be restored ("Could not find variable" at
    the first Session::Run), although `tf.saved_model.load` would run the model fine.
    """
    captured = {id(v): v for signature in signatures.values() for v in signature.variables}
    explainer.serving_variables = list(captured.values())


def warmup_requests(signatures: dict, image_size: tuple[int, int], batch_sizes: Sequence[int]):
    """One PredictionLog per signature (serving_default too: its own feeds and fetches, so its own
    executor in TF Serving's session) and batch size, with plausible inputs (noise, -1)."""
    from tensorflow_serving.apis import model_pb2, predict_pb2, prediction_log_pb2

    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, size=(*image_size, 3), dtype=np.uint8)
    jpeg = tf.io.encode_jpeg(image).numpy()
    for name in signatures:
        inputs = {spec.name for spec in tf.nest.flatten(signatures[name].structured_input_signature)}
        for batch in batch_sizes:
            request = predict_pb2.PredictRequest(model_spec=model_pb2.ModelSpec(signature_name=name))
            if "images" in inputs:
                request.inputs["images"].CopyFrom(tf.make_tensor_proto(np.stack([image] * batch)))
            if "image_bytes" in inputs:
                request.inputs["image_bytes"].CopyFrom(tf.make_tensor_proto([jpeg] * batch))
            if "class_index" in inputs:
                request.inputs["class_index"].CopyFrom(tf.make_tensor_proto(np.full(batch, -1, np.int32)))
            yield prediction_log_pb2.PredictionLog(predict_log=prediction_log_pb2.PredictLog(request=request))


def export_savedmodel(
    backbone: str,
    weights: str,
    methods: Sequence[str],
    model_name: str,
    base_path: str,
    version: int | None = None,
    target_layer: str | None = None,
    target_layers: Sequence[str] = (),
    image_size: int | None = None,
    preprocess: str = "auto",
    labels: str | None = None,
    top_k: int = 5,
    jit_compile: bool = False,
    warmup_batch_sizes: Sequence[int] = (1, 8),
    max_batch_size: int = 128,
    max_image_pixels: int = DEFAULT_MAX_PIXELS,
    top_k_maps: int = 0,
    feature_maps: int = 36,
    scorecam_channels: int = 64,
    ablationcam_channels: int = 64,
    precision: str = "float32",
    log: Callable[[str], None] = print,
) -> pathlib.Path:
    """Export `backbone` with the given CAM methods; returns `<base_path>/<model_name>/<version>`."""
    started = time.perf_counter()

    def step(message: str) -> None:
        log(f"[{time.perf_counter() - started:6.1f}s] {message}")

    if not methods:
        raise ValueError("give at least one method")
    method_objects = [get_method(m) for m in methods]
    model_dir = pathlib.Path(base_path) / model_name
    version = version or next_version(model_dir)
    final_dir = model_dir / str(version)
    if final_dir.exists():
        raise FileExistsError(f"{final_dir} exists: choose another --version")

    step(f"loading {backbone} (weights: {weights}, computing in {precision})")
    split = load_backbone(backbone, weights, target_layer, image_size, preprocess, target_layers, precision)
    for note in split.notes:
        step(note)
    step(
        f"target layer {split.target_layer!r} {tuple(split.features.output.shape[1:])}, "
        f"input {split.image_size}, {split.num_classes} classes"
    )
    explainer = Explainer(
        split,
        method_objects,
        load_labels(labels, split.num_classes),
        top_k=top_k,
        max_batch_size=max_batch_size,
        max_image_pixels=max_image_pixels,
        jit_compile=jit_compile,
        top_k_maps=top_k_maps,
        feature_maps=feature_maps,
        scorecam_channels=scorecam_channels,
        ablationcam_channels=ablationcam_channels,
    )
    if split.fusion_layers:
        step(f"fused maps ({', '.join(explainer.fused_methods)}) over {', '.join(split.fusion_layers)}")
    if any(m.guided for m in method_objects):
        swaps = survey(split.features, split.head)
        step(f"guided backpropagation through {len(swaps.guided)} ReLU layers"
             + (f"; gradients pass unchanged through {', '.join(sorted(swaps.unguided))}" if swaps.unguided else ""))
    if precision != "float32":
        step(f"{precision} maps vs float32 on the same weights (probe images: samples/ and noise):")
        for drift in check_precision(explainer, split.image_size, precision):
            step(f"  {drift}")
    step("tracing signatures")
    signatures = explainer.signatures(default_method=method_objects[0].name)
    for name, signature in signatures.items():
        if python_callback_ops(signature):
            raise RuntimeError(f"signature {name!r} calls back into Python: TF Serving cannot run it")
    track_captured_variables(explainer, signatures)

    model_dir.mkdir(parents=True, exist_ok=True)
    staging = pathlib.Path(tempfile.mkdtemp(prefix=f".{version}-", dir=model_dir))
    try:
        step(f"saving {len(signatures)} signatures: {', '.join(signatures)}")
        tf.saved_model.save(explainer, str(staging), signatures=signatures)
        warmup_path = staging / WARMUP_FILE
        warmup_path.parent.mkdir()
        count = 0
        with tf.io.TFRecordWriter(str(warmup_path)) as writer:
            for record in warmup_requests(signatures, split.image_size, warmup_batch_sizes):
                writer.write(record.SerializeToString())
                count += 1
        step(f"wrote {count} warm-up requests (batch sizes {list(warmup_batch_sizes)})")
        step(str(verify(staging, signatures)))
        if jit_compile:
            step("compiled with XLA: TF Serving runs it only with --xla_cpu_compilation_enabled=true or "
                 "--xla_gpu_compilation_enabled=true (python -m serving.tfserving adds the flag itself)")
        os.rename(staging, final_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    size = sum(f.stat().st_size for f in final_dir.rglob("*") if f.is_file())
    step(f"exported {final_dir} ({size / 2**20:.1f} MiB)")
    return final_dir
