"""Save the signatures as a SavedModel that TensorFlow Serving's loader runs (the `save` step of the export)."""

from __future__ import annotations

import contextlib
import pathlib
import re
from typing import Mapping, Sequence

import tensorflow as tf

PYTHON_CALLBACK_OPS = {"PyFunc", "PyFuncStateless", "EagerPyFunc", "NumpyFunction"}
# What TensorFlow accepts as the first name scope of a graph node (tensorflow/python/framework/ops.py).
ROOT_SCOPE_NAME = re.compile(r"^[A-Za-z0-9.][A-Za-z0-9_./>-]*$")


def python_callback_ops(signature: tf.types.experimental.ConcreteFunction) -> set[str]:
    """Op types that would call back into Python (not servable by TF Serving) in a signature."""
    graph = signature.graph.as_graph_def()
    nodes = list(graph.node) + [n for f in graph.library.function for n in f.node_def]
    return {n.op for n in nodes} & PYTHON_CALLBACK_OPS


def servable(variables: Sequence[tf.Variable]) -> tf.Module:
    """The object to save: the variables the signatures capture, and nothing else.

    TF Serving restores variables with the saver's restore op, which covers only the variables the
    saved object graph tracks. Keras 3 layers held by a tf.Module are not tracked that way, so
    saving the explainer itself would leave their variables in the graph but never restore them
    ("Could not find variable" at the first Session::Run), although `tf.saved_model.load` would run
    the model fine. Leaving the Keras objects out also stores each weight once and spares the saver
    a walk through every layer. The signatures (passed to tf.saved_model.save) bring the functions.
    """
    root = tf.Module(name="explainer")
    root.serving_variables = list(variables)
    return root


def captured_variables(signatures: Mapping[str, tf.types.experimental.ConcreteFunction]) -> list[tf.Variable]:
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


def save(signatures: Mapping[str, tf.types.experimental.ConcreteFunction], variables: Sequence[tf.Variable],
         folder: str | pathlib.Path) -> None:
    """Save `signatures` and the `variables` they capture into `folder`; refuses a signature that calls
    back into Python, which TF Serving cannot run."""
    for name, signature in signatures.items():
        if python_callback_ops(signature):
            raise RuntimeError(f"signature {name!r} calls back into Python: TF Serving cannot run it")
    # Without the gradient functions of custom gradients (guided backpropagation's ReLUs: one per layer):
    # nobody differentiates a served model, and every function of the library costs the load.
    options = tf.saved_model.SaveOptions(experimental_custom_gradients=False)
    with graph_safe_variable_names(variables):
        tf.saved_model.save(servable(variables), str(folder), signatures=dict(signatures), options=options)
