"""A loaded version of a model and its signatures, run the way TF Serving runs them.

A version is loaded with C++ LoadSavedModel and every request is one Session::Run on the
SignatureDef's tensor names, with the output_filter as the fetch list (serving/servables/session.py).
Requests are checked as TF Serving checks them (input names, dtypes, output names); shapes and
batch sizes are checked by the graph itself, and the graph's errors keep TensorFlow's status code.
"""

from __future__ import annotations

import dataclasses
from typing import Mapping, Sequence

import grpc
import numpy as np
from tensorflow.core.framework import tensor_pb2
from tensorflow.core.protobuf import meta_graph_pb2
from tensorflow_serving.apis import get_model_metadata_pb2

from .errors import ServingError, clean_tf_message, grpc_code
from .servables.session import SavedModelSession, SessionError
from .servables.warmup import read_warmup_requests
from .tensors import decode_tensor, dtype_name

DEFAULT_SIGNATURE = "serving_default"
INIT_OP_SIGNATURE = "__saved_model_init_op"  # in the SignatureDef map of TF2 SavedModels; not servable


class Signature:
    """One SignatureDef of a loaded version: checks a request the way TF Serving does, runs it
    with one Session::Run on the SignatureDef's tensor names."""

    def __init__(self, name: str, signature_def: meta_graph_pb2.SignatureDef, session: SavedModelSession):
        self.name = name
        self.method_name = signature_def.method_name
        self.inputs: dict[str, meta_graph_pb2.TensorInfo] = dict(signature_def.inputs)
        self.outputs: dict[str, meta_graph_pb2.TensorInfo] = dict(signature_def.outputs)
        self._session = session

    @property
    def batchable(self) -> bool:
        """Every input and output is batched on dimension 0, so requests can be concatenated."""
        infos = list(self.inputs.values()) + list(self.outputs.values())
        return all(not i.tensor_shape.unknown_rank and i.tensor_shape.dim and i.tensor_shape.dim[0].size == -1
                   for i in infos)

    @property
    def explains(self) -> bool:
        """It returns a heatmap (an explain signature, its compact answer; not predict)."""
        return not {"heatmap", "heatmap_uint8", "heatmap_png_bytes"}.isdisjoint(self.outputs)

    def check_output_filter(self, output_filter: Sequence[str]) -> tuple[str, ...] | None:
        """The outputs to compute (None: all), or INVALID_ARGUMENT naming the unknown one."""
        seen = []
        for alias in output_filter:
            if alias not in self.outputs:
                raise ServingError(
                    grpc.StatusCode.INVALID_ARGUMENT,
                    f"output tensor alias not found in signature: {alias} "
                    f"Outputs expected to be in the set {{{','.join(sorted(self.outputs))}}}.",
                )
            if alias in seen:
                raise ServingError(grpc.StatusCode.INVALID_ARGUMENT, f"duplicate output tensor alias: {alias}")
            seen.append(alias)
        return tuple(sorted(seen)) if seen and set(seen) != set(self.outputs) else None

    def decode_inputs(
        self, protos: Mapping[str, tensor_pb2.TensorProto], max_bytes: int
    ) -> tuple[dict[str, np.ndarray], int | None]:
        """Check names and dtypes, decode; returns the arrays and their common size on dimension 0.

        Shapes are not checked here, as TF Serving does not check them: the graph checks its own
        contract. The size is None when an input has no dimension 0 or the inputs disagree on it
        (such a request cannot be batched).
        """
        sent, expected = set(protos), set(self.inputs)
        if sent != expected:
            raise ServingError(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"inputs do not match signature '{self.name}': expected {{{','.join(sorted(expected))}}}, "
                f"got {{{','.join(sorted(sent))}}}. "
                f"Sent extra: {{{','.join(sorted(sent - expected))}}}. "
                f"Missing but required: {{{','.join(sorted(expected - sent))}}}.",
            )
        arrays = {}
        for name in sorted(expected):
            proto, info = protos[name], self.inputs[name]
            if proto.dtype != info.dtype:
                raise ServingError(
                    grpc.StatusCode.INVALID_ARGUMENT,
                    f"input '{name}' of signature '{self.name}': expected dtype {dtype_name(info.dtype)}, "
                    f"got {dtype_name(proto.dtype)}",
                )
            arrays[name] = decode_tensor(name, proto, max_bytes)
        sizes = {a.shape[0] if a.ndim else None for a in arrays.values()}
        return arrays, sizes.pop() if len(sizes) == 1 else None

    def run(self, inputs: Mapping[str, np.ndarray], outputs: tuple[str, ...] | None = None) -> dict[str, np.ndarray]:
        """One Session::Run fetching `outputs` (None: all); TensorFlow's status code is kept."""
        aliases = list(outputs or self.outputs)
        try:
            fetched = self._session.run(
                {self.inputs[k].name: v for k, v in inputs.items()}, [self.outputs[a].name for a in aliases]
            )
        except SessionError as e:
            raise ServingError(grpc_code(e.code), clean_tf_message(e.message)) from None
        return dict(zip(aliases, fetched))


@dataclasses.dataclass
class ModelVersion:
    """One loaded version of a model: a TF Serving-style session and its signatures."""

    model_name: str
    version: int
    path: str
    signatures: dict[str, Signature]
    signature_defs: get_model_metadata_pb2.SignatureDefMap
    session: SavedModelSession  # closed when the last request using this version lets go of it

    @classmethod
    def load(cls, model_name: str, version: int, path: str, config: bytes = b"") -> "ModelVersion":
        """LoadSavedModel with the session settings `config` (a serialized tensorflow.ConfigProto)."""
        session = SavedModelSession(path, config=config)
        defs = session.signature_defs
        signatures = {name: Signature(name, defs[name], session) for name in defs if name != INIT_OP_SIGNATURE}
        signature_defs = get_model_metadata_pb2.SignatureDefMap(signature_def=defs)
        return cls(model_name, version, path, signatures, signature_defs, session)

    def signature(self, name: str) -> Signature:
        """The named signature ("" = serving_default), or FAILED_PRECONDITION like TF Serving."""
        name = name or DEFAULT_SIGNATURE
        if name not in self.signatures:
            raise ServingError(
                grpc.StatusCode.FAILED_PRECONDITION,
                f'Serving signature key "{name}" not found. '
                f"Signatures of model '{self.model_name}' version {self.version}: {', '.join(sorted(self.signatures))}",
            )
        return self.signatures[name]

    def warm_up(self, max_bytes: int = 2**31 - 1) -> int:
        """Replay `assets.extra/tf_serving_warmup_requests` (PredictionLog records); returns the count.

        A failing record fails the load, as in TF Serving: a version that cannot answer its own
        warm-up requests should not be served.
        """
        count = 0
        for request in read_warmup_requests(self.path):
            signature = self.signature(request.model_spec.signature_name)
            outputs = signature.check_output_filter(request.output_filter)
            inputs, _ = signature.decode_inputs(request.inputs, max_bytes)
            signature.run(inputs, outputs)
            count += 1
        return count
