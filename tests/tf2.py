"""A SavedModel called through TF2's loader (`tf.saved_model.load`), every signature by name.

The exporter saves the families as functions and writes every other signature into the saved graph as a
view of one (export/signature_defs.py), which TF2's loader does not rebuild: here a view runs its family's
function with the view's inputs fixed, as the saved graph does under TF Serving's loader. So the tests
can compare any signature under TF Serving's loader with this independent path.
"""

from __future__ import annotations

import functools
import pathlib

import tensorflow as tf
from tensorflow.core.protobuf import saved_model_pb2

from camserve.export.signature_defs import INIT_SIGNATURE, read


class TF2:
    def __init__(self, path: str | pathlib.Path):
        self.loaded = tf.saved_model.load(str(path))
        saved = saved_model_pb2.SavedModel.FromString(pathlib.Path(path, "saved_model.pb").read_bytes())
        meta_graph = saved.meta_graphs[0]
        self.views = {view.name: view for view in read(meta_graph)}
        self.signatures = {name: functools.partial(self._call, name) for name in meta_graph.signature_def
                           if name != INIT_SIGNATURE}

    def _call(self, name: str, **inputs) -> dict[str, tf.Tensor]:
        if name in self.loaded.signatures:
            return self.loaded.signatures[name](**{k: tf.constant(v) for k, v in inputs.items()})
        view = self.views[name]
        images = next(v for k, v in inputs.items() if k in ("images", "image_bytes"))
        rows = tf.shape(tf.constant(images))[:1]
        outputs = self._call(view.target, **inputs, **{k: tf.fill(rows, v) for k, v in view.fixed.items()})
        return {key: outputs[key] for key in view.outputs}
