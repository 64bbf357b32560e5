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
from typing import TYPE_CHECKING, Callable, Collection, Iterator, Sequence

import numpy as np
import tensorflow as tf

from camserve.serving.servables.versions import numeric_versions
from camserve.serving.servables.warmup import write_warmup_requests

from .backbone import load_backbone
from .explainer import Explainer
from .gpu_kernels import check_saved_model as check_gpu_kernels
from .guided import survey
from .methods import get_method
from .options import ExportOptions
from .precision import check as check_precision
from .signature_defs import aliases, share_tensors
from .signatures import build_signatures
from .verify import verify

if TYPE_CHECKING:
    from tensorflow_serving.apis import predict_pb2

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


def servable(explainer: tf.Module, signatures: dict) -> tf.Module:
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


def request_maker(image_size: tuple[int, int]) -> Callable[..., "predict_pb2.PredictRequest"]:
    """A function (signature name, signature, batch size, outputs) -> PredictRequest on plausible
    inputs: the same noise image (as uint8 pixels or a JPEG) and class -1 in every row."""
    from tensorflow_serving.apis import predict_pb2

    from camserve.client import protos

    image = np.random.default_rng(0).integers(0, 256, size=(*image_size, 3), dtype=np.uint8)
    jpeg = tf.io.encode_jpeg(image).numpy()

    def make(name: str, signature, batch: int, outputs: Sequence[str] = ()) -> predict_pb2.PredictRequest:
        inputs = {spec.name for spec in tf.nest.flatten(signature.structured_input_signature)}
        request = protos.predict_request(
            protos.ModelSpec(signature_name=name),
            images=np.stack([image] * batch) if "images" in inputs else None,
            image_bytes=[jpeg] * batch if "image_bytes" in inputs else None,
            class_index=np.full(batch, -1, np.int32) if "class_index" in inputs else None,
            output_filter=outputs,
        )
        return predict_pb2.PredictRequest.FromString(request.SerializeToString())

    return make


def warmup_requests(signatures: dict, image_size: tuple[int, int], batch_sizes: Sequence[int],
                    alias_targets: Collection[str] = ()) -> Iterator["predict_pb2.PredictRequest"]:
    """The warm-up: each executor that the client, the CLI and the page use by default, built before
    the server says it is ready.

    TF Serving's session builds one executor per set of feeds and fetches, so each signature gets a
    request at the first batch size for each output set our callers send by default
    (client/outputs.py), and none for what nobody sends by default (every output; the feature_maps
    debug view). Aliases (signature_defs.py) run their target's tensors and need none. Further batch
    sizes warm what depends on shapes (XLA's compilations, cuDNN's algorithm choice), once per
    numeric core, which a `<name>` and its `<name>_bytes` signature share.
    """
    from camserve.client.outputs import default_output_sets

    make = request_maker(image_size)
    for batch in batch_sizes:
        first = batch == batch_sizes[0]
        for name, signature in signatures.items():
            if name in alias_targets or (not first and f"{name}_bytes" in signatures):
                continue
            output_sets = default_output_sets(signature.structured_outputs)
            for outputs in output_sets if first else output_sets[:1]:
                yield make(name, signature, batch, outputs)


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
                          o.precision, o.token_grid, o.prefix_tokens)
    for note in split.notes:
        step(note)
    step(
        f"target layer {split.target_layer!r} {tuple(split.features.output.shape[1:])}"
        + (f" ({split.token_grid})" if split.token_grid else "")
        + f", input {split.image_size}, {split.num_classes} classes"
    )
    labels = load_labels(o.labels, split.num_classes)
    explainer = Explainer(split, method_objects, o)
    if split.fusion_layers:
        step(f"fused maps ({', '.join(explainer.fused_methods)}) over {', '.join(split.fusion_layers)}")
    if any(m.guided for m in method_objects):
        swaps = survey(split.features, split.head)
        step(f"guided backpropagation through {len(swaps.guided)} ReLU layers"
             + (f"; gradients pass unchanged through {', '.join(sorted(swaps.unguided))}" if swaps.unguided else ""))
    if o.precision != "float32":
        step(f"{o.precision} maps vs float32 on the same weights (probe images: the sample photos and noise):")
        for drift in check_precision(explainer, split.image_size, o.precision):
            step(f"  {drift}")
    step("tracing signatures")
    signatures = build_signatures(explainer, labels, default_method=method_objects[0].name)
    alias_targets = aliases(signatures, default_method=method_objects[0].name)
    for name, signature in signatures.items():
        if python_callback_ops(signature):
            raise RuntimeError(f"signature {name!r} calls back into Python: TF Serving cannot run it")

    model_dir.mkdir(parents=True, exist_ok=True)
    staging = pathlib.Path(tempfile.mkdtemp(prefix=f".{version}-", dir=model_dir))
    try:
        step(f"saving {len(signatures)} signatures: {', '.join(signatures)}")
        with graph_safe_variable_names(captured_variables(signatures)):
            tf.saved_model.save(servable(explainer, signatures), str(staging), signatures=signatures)
        share_tensors(staging, alias_targets)
        step(str(check_gpu_kernels(staging, jit=o.jit_compile)))  # refuses a CPU-only op between GPU ops
        count = write_warmup_requests(staging, warmup_requests(signatures, split.image_size, o.warmup_batch_sizes,
                                                               alias_targets))
        step(f"wrote {count} warm-up requests (batch sizes {list(o.warmup_batch_sizes)})")
        step("signatures that run another's tensors, sharing its executor and warm-up: "
             + ", ".join(f"{alias} -> {target}" for alias, target in alias_targets.items()))
        make = request_maker(split.image_size)  # and every output of every signature, aliases included:
        step(str(verify(staging, signatures, [make(name, signature, 1) for name, signature in signatures.items()])))
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
