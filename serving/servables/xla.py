"""Whether a SavedModel needs TF Serving's XLA flags."""

from __future__ import annotations

import pathlib


def needs_xla(export_dir: str | pathlib.Path) -> bool:
    """Whether the SavedModel holds functions that must be compiled with XLA (`--jit-compile`).

    TF Serving turns XLA off unless it runs with --xla_cpu_compilation_enabled=true or
    --xla_gpu_compilation_enabled=true (model_servers/main.cc calls DisableXlaCompilation() when
    both are false); such a model then fails its first request with "XLA compilation disabled".
    A directory without saved_model.pb (still being written) needs nothing yet.
    """
    from tensorflow.core.protobuf import saved_model_pb2

    path = pathlib.Path(export_dir, "saved_model.pb")
    if not path.is_file():
        return False
    saved = saved_model_pb2.SavedModel.FromString(path.read_bytes())
    for meta_graph in saved.meta_graphs:
        library = meta_graph.graph_def.library.function
        nodes = [*meta_graph.graph_def.node, *(node for function in library for node in function.node_def)]
        attributes = [*(f.attr for f in library), *(node.attr for node in nodes)]
        if any(attrs["_XlaMustCompile"].b for attrs in attributes if "_XlaMustCompile" in attrs):
            return True
    return False
