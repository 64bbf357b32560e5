"""Signatures that run another signature's tensors, so that TF Serving builds no executor for them.

TF Serving runs a request as one Session::Run on the SignatureDef's tensor names, and its session
builds one executor per distinct set of fed and fetched tensors (Grappler over the whole graph:
~1-2 s for ResNet50 on a CPU) at the first call that uses it. `tf.saved_model.save` gives every
signature placeholders and a call node of its own, so `serving_default` (a copy of
`<method>_bytes`) and `<name>_compact` (`<name>_bytes` with fewer outputs) would each cost an
executor build and a warm-up request of their own. After saving, their SignatureDefs are pointed
at the tensors of the signature they copy: their calls then share its executor and its warm-up
(and, with TF Serving's batching, its queue). The TF2 functions (`tf.saved_model.load`) are
unchanged; the exporter checks every signature, aliases included, against its TF2 function under
TF Serving's loader (verify.py).
"""

from __future__ import annotations

import pathlib
from typing import Collection, Mapping

COMPACT = "_compact"  # <name>_compact: <name>_bytes with only the compact outputs (client/outputs.py)
DEFAULT_SIGNATURE = "serving_default"


def aliases(signature_names: Collection[str], default_method: str) -> dict[str, str]:
    """alias -> the signature whose tensors it runs: serving_default and every <name>_compact."""
    found = {name: name.removesuffix(COMPACT) + "_bytes" for name in signature_names if name.endswith(COMPACT)}
    return {**found, DEFAULT_SIGNATURE: f"{default_method}_bytes"}


def share_tensors(export_dir: str | pathlib.Path, alias_targets: Mapping[str, str]) -> None:
    """Point each alias's SignatureDef at its target's tensors (its own outputs only), in place;
    saved_model.pb is rewritten and its fingerprint (fingerprint.pb hashes it) made again."""
    from tensorflow.core.protobuf import saved_model_pb2
    from tensorflow.python.saved_model.pywrap_saved_model import fingerprinting

    path = pathlib.Path(export_dir, "saved_model.pb")
    saved = saved_model_pb2.SavedModel.FromString(path.read_bytes())
    for meta_graph in saved.meta_graphs:
        defs = meta_graph.signature_def
        for alias, target in alias_targets.items():
            own, shared = defs[alias], defs[target]
            if set(own.inputs) != set(shared.inputs) or not set(own.outputs) <= set(shared.outputs):
                raise ValueError(f"signature {alias!r} is not a view of {target!r}: inputs {sorted(own.inputs)} vs "
                                 f"{sorted(shared.inputs)}, outputs {sorted(own.outputs)} vs {sorted(shared.outputs)}")
            for infos, source in ((own.inputs, shared.inputs), (own.outputs, shared.outputs)):
                for key in infos:
                    infos[key].CopyFrom(source[key])
    path.write_bytes(saved.SerializeToString())
    pathlib.Path(export_dir, "fingerprint.pb").write_bytes(fingerprinting.CreateFingerprintDef(str(export_dir)))
