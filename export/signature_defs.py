"""Signatures written into the saved graph that run a family's function with some inputs fixed.

Every function in a SavedModel's library costs TF Serving's load and each executor build
(docs/BENCHMARKS.md "Start-up and export"), and `tf.saved_model.save` makes two functions for each
signature it is given. So the exporter saves only the families (signatures.py) and writes every other
signature as a view of one, after saving:

- a method's own signatures (`gradcam`, `gradcam_bytes`, `gradcam_smooth`, ...): the family's call node
  copied, its `method` input fed `tf.fill([N], name)` made from the images' batch size;
- `predict`, `feature_maps` (and `_bytes`): likewise with the method `predict` and `class_index` -1,
  their outputs only;
- `<name>_compact` and `serving_default`: aliases, the tensors of another signature (`<name>_bytes`,
  the first method's) with fewer outputs, or all: a call of theirs runs on its executor, and its warm-up
  (and, with TF Serving's batching, its queue).

A view adds nodes to the graph, not functions: TF Serving serves it as any signature; `tf.saved_model.load`,
which rebuilds signatures from the saved functions, sees the families alone.
"""

from __future__ import annotations

import dataclasses
import pathlib
from typing import Collection, Mapping, Sequence

import tensorflow as tf

from camserve.client.outputs import EXPLAIN_SIGNATURE, METHOD_INPUT, PREDICT, VARIANT_SUFFIXES, default_outputs

COMPACT = "_compact"  # <name>_compact: <name>_bytes with only the compact outputs (client/outputs.py)
DEFAULT_SIGNATURE = "serving_default"
INIT_SIGNATURE = "__saved_model_init_op"  # in the SignatureDef map of TF2 SavedModels; not servable
KINDS = ("", "_bytes")  # the images input, the image_bytes input
GUIDED = ("guided", "guided_png_bytes")  # Guided Grad-CAM's picture: in the signatures of that method only
FEATURE_MAPS = ("feature_maps", "feature_channels")
# What predict returns: the prediction of the explain family, without any map.
PREDICTION = ("probabilities", "logits", "class_index", "score", "top_k_indices", "top_k_scores", "class_label",
              "top_k_labels", "error")


@dataclasses.dataclass(frozen=True)
class View:
    """A signature that runs `target`'s function with the inputs of `fixed` set in every row (none: an
    alias, `target`'s tensors), returning `outputs`."""

    name: str
    target: str
    fixed: Mapping[str, str | int]
    outputs: tuple[str, ...]


def plan(families: Mapping[str, Collection[str]], methods: Sequence[str], fused: Collection[str],
         guided: Collection[str], default_method: str) -> list[View]:
    """The views of the module docstring, each after the signature it runs: `families` name each family
    signature and its outputs; `fused`: the methods of the fused family; `guided`: the methods with
    Guided Grad-CAM's picture."""
    views: list[View] = []
    outputs = {name: tuple(keys) for name, keys in families.items()}

    def add(view: View) -> None:
        views.append(view)
        outputs[view.name] = view.outputs

    for kind in KINDS:
        for variant in ("", *VARIANT_SUFFIXES):
            family = f"{EXPLAIN_SIGNATURE}{variant}{kind}"
            if family not in families:
                continue
            for method in fused if variant == "_fused" else methods:
                dropped = (*FEATURE_MAPS, *(() if method in guided else GUIDED))
                add(View(f"{method}{variant}{kind}", family, {METHOD_INPUT: method},
                         tuple(o for o in outputs[family] if o not in dropped)))
        explain = f"{EXPLAIN_SIGNATURE}{kind}"
        prediction = {METHOD_INPUT: PREDICT, "class_index": -1}
        add(View(f"predict{kind}", explain, prediction, PREDICTION))
        if set(FEATURE_MAPS) <= set(outputs[explain]):
            add(View(f"feature_maps{kind}", explain, prediction, (*FEATURE_MAPS, "error")))
    for name in [n.removesuffix("_bytes") for n in outputs if n.endswith("_bytes")]:
        compact = default_outputs(outputs[f"{name}_bytes"])
        if compact:
            add(View(f"{name}{COMPACT}", f"{name}_bytes", {}, tuple(compact)))
    add(View(DEFAULT_SIGNATURE, f"{default_method}_bytes", {}, outputs[f"{default_method}_bytes"]))
    return views


def aliases(views: Sequence[View]) -> dict[str, str]:
    """alias -> the signature whose tensors it runs."""
    return {view.name: view.target for view in views if not view.fixed}


def write(export_dir: str | pathlib.Path, views: Sequence[View]) -> None:
    """Add `views` to the saved graph and its SignatureDefs, in place; saved_model.pb is rewritten and its
    fingerprint (fingerprint.pb hashes it) made again."""
    from tensorflow.core.protobuf import saved_model_pb2
    from tensorflow.python.saved_model.pywrap_saved_model import fingerprinting

    path = pathlib.Path(export_dir, "saved_model.pb")
    saved = saved_model_pb2.SavedModel.FromString(path.read_bytes())
    for meta_graph in saved.meta_graphs:
        for view in views:
            _add(meta_graph, view)
    path.write_bytes(saved.SerializeToString())
    pathlib.Path(export_dir, "fingerprint.pb").write_bytes(fingerprinting.CreateFingerprintDef(str(export_dir)))


def _add(meta_graph, view: View) -> None:
    defs = meta_graph.signature_def
    target = defs[view.target]
    missing = set(view.outputs) - set(target.outputs)
    if missing:
        raise ValueError(f"signature {view.name!r}: {view.target!r} has no outputs {sorted(missing)}")
    own = defs[view.name]
    own.method_name = target.method_name
    for key, info in target.inputs.items():
        if key not in view.fixed:
            own.inputs[key].CopyFrom(info)
    for key in view.outputs:
        own.outputs[key].CopyFrom(target.outputs[key])
    if not view.fixed:
        return
    # The target's call node, copied, its fixed inputs fed by tf.fill([N], value), N the images' batch size.
    [node_name] = {info.name.split(":")[0] for info in target.outputs.values()}
    graph = meta_graph.graph_def
    call = next(node for node in graph.node if node.name == node_name)
    copy = graph.node.add()
    copy.CopyFrom(call)
    copy.name = f"view/{view.name}"
    images = next(info for key, info in target.inputs.items() if key in ("images", "image_bytes"))
    for key, value in view.fixed.items():
        fed = _tensor(target.inputs[key].name)
        [position] = [i for i, name in enumerate(copy.input) if _tensor(name) == fed]
        copy.input[position] = _fill(graph, f"{copy.name}/{key}", images, value)
    for key in view.outputs:
        own.outputs[key].name = f"{copy.name}:{target.outputs[key].name.split(':')[1]}"


def read(meta_graph) -> list[View]:
    """The views a saved graph holds (`write`'s, read back from its nodes), each with the signature it runs."""
    defs, nodes = meta_graph.signature_def, {node.name: node for node in meta_graph.graph_def.node}

    def node_of(name: str) -> str:
        [node] = {info.name.split(":")[0] for info in defs[name].outputs.values()}
        return node

    families = {}  # call node -> the family signature: of those naming its tensors, the one with every output
    for name in sorted((n for n in defs if n != INIT_SIGNATURE and not node_of(n).startswith("view/")),
                       key=lambda n: len(defs[n].outputs)):
        families[node_of(name)] = name
    views = []
    for name in defs:
        if name == INIT_SIGNATURE or node_of(name) in families and families[node_of(name)] == name:
            continue
        node = node_of(name)
        if node != f"view/{name}":  # an alias: another signature's tensors
            target = families.get(node) or node.removeprefix("view/")
            views.append(View(name, target, {}, tuple(defs[name].outputs)))
            continue
        call = nodes[node]
        [target] = [family for call_name, family in families.items() if nodes[call_name].attr["f"] == call.attr["f"]
                    and defs[family].inputs.keys() - {METHOD_INPUT, "class_index"} == defs[name].inputs.keys()
                    - {METHOD_INPUT, "class_index"}]
        fixed = {}
        for key in defs[target].inputs.keys() - defs[name].inputs.keys():
            value = tf.make_ndarray(nodes[f"{node}/{key}/value"].attr["value"].tensor)
            fixed[key] = value.item().decode() if value.dtype == object else int(value)
        views.append(View(name, target, fixed, tuple(defs[name].outputs)))
    return views


def _tensor(name: str) -> str:
    """A node input or tensor name as "node:index"."""
    return name if ":" in name else f"{name}:0"


def _fill(graph, scope: str, images, value: str | int) -> str:
    """Nodes under `scope` that make tf.fill([N], value) from the images input's first dimension, added
    to `graph`; returns the name of their output."""
    with tf.Graph().as_default() as scratch:
        x = tf.compat.v1.placeholder(tf.as_dtype(images.dtype), name="images")
        tf.fill(tf.shape(x)[:1], tf.constant(value, name="value"), name="fill")
    for node in scratch.as_graph_def().node:
        if node.name == "images":
            continue
        added = graph.node.add()
        added.CopyFrom(node)
        added.name = f"{scope}/{node.name}"
        added.input[:] = [images.name if name == "images" else f"{scope}/{name}" for name in node.input]
    return f"{scope}/fill"
