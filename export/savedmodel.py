"""Write the explainer as a versioned SavedModel that TensorFlow Serving can poll safely.

The model is saved to a hidden temporary directory beside the versions and renamed into
`<base>/<name>/<version>/` only when complete (TF Serving ignores non-numeric directories), with
warm-up requests in `assets.extra/` so that the first real request is not slow.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import pathlib
import re
import shutil
import tempfile
import time
from typing import Callable, Sequence

import numpy as np
import tensorflow as tf

from export.backbone import load_backbone
from export.explainer import Explainer
from export.guided import survey
from export.methods import get_method
from export.options import ExportOptions
from export.precision import check as check_precision
from export.tfs_loader import WARMUP_FILE
from export.verify import verify
from serving.versions import numeric_versions

IMAGENET_LABELS = pathlib.Path(__file__).parent / "data" / "imagenet_classes.txt"
PYTHON_CALLBACK_OPS = {"PyFunc", "PyFuncStateless", "EagerPyFunc", "NumpyFunction"}
# What TensorFlow accepts as the first name scope of a graph node (tensorflow/python/framework/ops.py).
ROOT_SCOPE_NAME = re.compile(r"^[A-Za-z0-9.][A-Za-z0-9_./>-]*$")


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


def python_callback_ops(signature: tf.types.experimental.ConcreteFunction) -> set[str]:
    """Op types that would call back into Python (not servable by TF Serving) in a signature."""
    graph = signature.graph.as_graph_def()
    nodes = list(graph.node) + [n for f in graph.library.function for n in f.node_def]
    return {n.op for n in nodes} & PYTHON_CALLBACK_OPS


def servable(explainer: Explainer, signatures: dict) -> tf.Module:
    """The object to save: the variables the signatures capture, and nothing else.

    TF Serving restores variables with the saver's restore op, which covers only the variables the
    saved object graph tracks. Keras 3 layers held by a tf.Module are not tracked that way, so
    saving the explainer itself would leave their variables in the graph but never restore them
    ("Could not find variable" at the first Session::Run), although `tf.saved_model.load` would run
    the model fine. Leaving the Keras objects out also stores each weight once and spares the saver
    a walk through every layer. The signatures (passed to tf.saved_model.save) bring the functions.
    """
    root = tf.Module(name=explainer.name)
    root.serving_variables = captured_variables(signatures)
    return root


def captured_variables(signatures: dict) -> list[tf.Variable]:
    """Every variable the signatures capture, once."""
    return list({id(v): v for signature in signatures.values() for v in signature.variables}.values())


@contextlib.contextmanager
def graph_safe_variable_names(variables: Sequence[tf.Variable]):
    """Let the saver name each variable's node in the saved graph, whatever its layer is called.

    Keras accepts layer names that a graph node may not start with (`_blocks__12___project_conv`),
    and its variables carry them. The saver makes a graph node per variable named after it, so
    saving failed ("... is not a valid root scope name"). While saving, such a variable is named
    "v" + its name. The node name is all that changes: TF Serving restores variables by their
    checkpoint keys, which follow the saved object (`serving_variables/N`), not the node names, and
    the layers keep their names. TensorFlow has no public way to rename a variable: the saver reads
    the name from the variable's handle name (`_shared_name` is that name without ":0").
    """
    renamed = []
    for variable in variables:
        if not ROOT_SCOPE_NAME.match(variable._shared_name):
            renamed.append((variable, variable._handle_name))
            variable._handle_name = "v" + variable._handle_name
    try:
        yield
    finally:
        for variable, name in renamed:
            variable._handle_name = name


def warmup_requests(signatures: dict, image_size: tuple[int, int], batch_sizes: Sequence[int]):
    """One PredictionLog per signature (serving_default too: its own feeds and fetches, so its own
    executor in TF Serving's session) and batch size, with plausible inputs (noise, -1)."""
    from tensorflow_serving.apis import predict_pb2, prediction_log_pb2

    from client import protos

    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, size=(*image_size, 3), dtype=np.uint8)
    jpeg = tf.io.encode_jpeg(image).numpy()
    for name in signatures:
        inputs = {spec.name for spec in tf.nest.flatten(signatures[name].structured_input_signature)}
        for batch in batch_sizes:
            request = protos.predict_request(
                protos.ModelSpec(signature_name=name),
                images=np.stack([image] * batch) if "images" in inputs else None,
                image_bytes=[jpeg] * batch if "image_bytes" in inputs else None,
                class_index=np.full(batch, -1, np.int32) if "class_index" in inputs else None,
            )
            yield prediction_log_pb2.PredictionLog(predict_log=prediction_log_pb2.PredictLog(
                request=predict_pb2.PredictRequest.FromString(request.SerializeToString())))


def export_savedmodel(options: ExportOptions | None = None, *, log: Callable[[str], None] = print,
                      **fields) -> pathlib.Path:
    """Export a backbone with the given CAM methods; returns `<base_path>/<model_name>/<version>`.

    Takes an ExportOptions, or its fields as keywords: `export_savedmodel(backbone="efficientnet_lite0",
    weights="none", methods=["gradcam", "cam"], model_name="efficientnet_lite0_cam")`.
    """
    if options is None:
        options = ExportOptions(**fields)
    elif fields:
        options = dataclasses.replace(options, **fields)
    o = options
    started = time.perf_counter()

    def step(message: str) -> None:
        log(f"[{time.perf_counter() - started:6.1f}s] {message}")

    method_objects = [get_method(m) for m in o.methods]
    model_dir = pathlib.Path(o.base_path) / o.model_name
    version = o.version or max(numeric_versions(str(model_dir)), default=0) + 1
    final_dir = model_dir / str(version)
    if final_dir.exists():
        raise FileExistsError(f"{final_dir} exists: choose another --version")

    step(f"loading {o.backbone} (weights: {o.weights}, computing in {o.precision})")
    split = load_backbone(o.backbone, o.weights, o.target_layer, o.image_size, o.preprocess, o.target_layers,
                          o.precision)
    for note in split.notes:
        step(note)
    step(
        f"target layer {split.target_layer!r} {tuple(split.features.output.shape[1:])}, "
        f"input {split.image_size}, {split.num_classes} classes"
    )
    explainer = Explainer(split, method_objects, load_labels(o.labels, split.num_classes), o)
    if split.fusion_layers:
        step(f"fused maps ({', '.join(explainer.fused_methods)}) over {', '.join(split.fusion_layers)}")
    if any(m.guided for m in method_objects):
        swaps = survey(split.features, split.head)
        step(f"guided backpropagation through {len(swaps.guided)} ReLU layers"
             + (f"; gradients pass unchanged through {', '.join(sorted(swaps.unguided))}" if swaps.unguided else ""))
    if o.precision != "float32":
        step(f"{o.precision} maps vs float32 on the same weights (probe images: samples/ and noise):")
        for drift in check_precision(explainer, split.image_size, o.precision):
            step(f"  {drift}")
    step("tracing signatures")
    signatures = explainer.signatures(default_method=method_objects[0].name)
    for name, signature in signatures.items():
        if python_callback_ops(signature):
            raise RuntimeError(f"signature {name!r} calls back into Python: TF Serving cannot run it")

    model_dir.mkdir(parents=True, exist_ok=True)
    staging = pathlib.Path(tempfile.mkdtemp(prefix=f".{version}-", dir=model_dir))
    try:
        step(f"saving {len(signatures)} signatures: {', '.join(signatures)}")
        with graph_safe_variable_names(captured_variables(signatures)):
            tf.saved_model.save(servable(explainer, signatures), str(staging), signatures=signatures)
        warmup_path = staging / WARMUP_FILE
        warmup_path.parent.mkdir()
        count = 0
        with tf.io.TFRecordWriter(str(warmup_path)) as writer:
            for record in warmup_requests(signatures, split.image_size, o.warmup_batch_sizes):
                writer.write(record.SerializeToString())
                count += 1
        step(f"wrote {count} warm-up requests (batch sizes {list(o.warmup_batch_sizes)})")
        step(str(verify(staging, signatures)))
        if o.jit_compile:
            step("compiled with XLA: TF Serving runs it only with --xla_cpu_compilation_enabled=true or "
                 "--xla_gpu_compilation_enabled=true (python -m serving.tfserving adds the flag itself)")
        os.rename(staging, final_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    size = sum(f.stat().st_size for f in final_dir.rglob("*") if f.is_file())
    step(f"exported {final_dir} ({size / 2**20:.1f} MiB)")
    return final_dir
