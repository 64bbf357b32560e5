"""Prove that TensorFlow Serving's loader runs a staged version before it is published.

`tf.saved_model.load` rebuilds the TF2 object graph and can run a model that TF Serving cannot
(variables captured by a function but not tracked by the saved object are not restored by the
saver: "Could not find variable ..."). So the exporter loads the staged directory the way TF Serving
does (serving/servables/session.py: LoadSavedModel + Session::Run), replays its whole warm-up file with each
record's output_filter as the fetch list, as TF Serving does before it serves a version, calls every
signature (aliases too: signature_defs.py) once for all its outputs, and compares every output with
the TF2 function that was saved. Any failure raises VerificationError, and the version directory
never appears.
"""

from __future__ import annotations

import dataclasses
import pathlib
from typing import TYPE_CHECKING, Iterable, Mapping

import numpy as np
import tensorflow as tf

from camserve.serving.servables.session import SavedModelSession, SessionError
from camserve.serving.servables.warmup import read_warmup_requests

if TYPE_CHECKING:
    from tensorflow_serving.apis import predict_pb2

# Session::Run and the TF2 function runtime run the same kernels; float outputs may still differ
# in the last bits where graph rewrites (op fusion) change the order of a sum.
FLOAT_TOLERANCE = 1e-4  # relative to the output's largest magnitude (at least 1)


class VerificationError(RuntimeError):
    """The staged model does not run, or runs differently, under TF Serving's loader."""


@dataclasses.dataclass
class Verified:
    requests: int
    signatures: int
    max_float_diff: float  # largest relative difference of a float output from the TF2 function
    max_int_diff: int  # largest difference of an integer output (e.g. heatmap_uint8 at a rounding edge)

    def __str__(self) -> str:
        return (
            f"verified with TensorFlow Serving's loader (LoadSavedModel + Session::Run): {self.requests} warm-up "
            f"requests and every output of {self.signatures} signatures, outputs equal to the TF2 functions "
            f"(largest float difference {self.max_float_diff:.1e}, integer {self.max_int_diff})"
        )


def difference(name: str, served: np.ndarray, expected: np.ndarray) -> tuple[float, int]:
    """(relative float difference, integer difference) of two outputs; raises if they disagree."""
    if served.shape != expected.shape or served.dtype != expected.dtype:
        raise VerificationError(
            f"output {name!r}: {served.dtype}{list(served.shape)} under Session::Run, "
            f"{expected.dtype}{list(expected.shape)} from the TF2 function"
        )
    if served.dtype == object:
        # PNG bytes follow heatmap_uint8, which is compared value by value below.
        if name.endswith("_png_bytes") or np.array_equal(served, expected):
            return 0.0, 0
        raise VerificationError(f"output {name!r} differs from the TF2 function")
    if served.dtype.kind == "f":
        scale = max(1.0, float(np.max(np.abs(expected), initial=0.0)))
        diff = float(np.max(np.abs(served.astype(np.float64) - expected), initial=0.0)) / scale
        if not diff <= FLOAT_TOLERANCE:  # NaN fails too
            raise VerificationError(f"output {name!r} differs from the TF2 function by {diff:.2e} (relative)")
        return diff, 0
    diff = int(np.max(np.abs(served.astype(np.int64) - expected.astype(np.int64)), initial=0))
    if diff > (1 if served.dtype == np.uint8 else 0):  # a rounded heatmap may move by one level
        raise VerificationError(f"output {name!r} differs from the TF2 function by {diff}")
    return 0.0, diff


def verify(
    export_dir: str | pathlib.Path, signatures: Mapping[str, tf.types.experimental.ConcreteFunction],
    requests: Iterable["predict_pb2.PredictRequest"] = (),
) -> Verified:
    """Load `export_dir` with TF Serving's loader, replay its warm-up, then run `requests` (one per
    signature, for every output); compare every output with `signatures`' TF2 functions."""
    try:
        session = SavedModelSession(export_dir)
    except SessionError as error:
        raise VerificationError(f"TensorFlow Serving's loader cannot load the model: {error}") from None
    with session:
        missing = set(signatures) - set(session.signature_defs)
        if missing:
            raise VerificationError(f"signatures {sorted(missing)} are not in the saved MetaGraph")
        warmup = list(read_warmup_requests(export_dir))
        expected_cache: dict = {}
        float_diff, int_diff = 0.0, 0
        for request in [*warmup, *requests]:
            name = request.model_spec.signature_name
            inputs = {k: tf.make_ndarray(v) for k, v in request.inputs.items()}
            try:
                served = session.run_signature(name, inputs, request.output_filter)
            except SessionError as error:
                raise VerificationError(f"TensorFlow Serving's loader cannot run signature {name!r}: {error}") from None
            key = (name, tuple(sorted((k, v.shape) for k, v in inputs.items())))  # every request: the same image
            if key not in expected_cache:
                expected_cache[key] = signatures[name](**{k: tf.constant(v) for k, v in inputs.items()})
            expected = expected_cache[key]
            if not request.output_filter and set(served) != set(expected):
                raise VerificationError(f"signature {name!r} returns {sorted(served)} under TF Serving's loader, "
                                        f"{sorted(expected)} from its TF2 function")
            for alias, value in served.items():
                f, i = difference(alias, value, expected[alias].numpy())
                float_diff, int_diff = max(float_diff, f), max(int_diff, i)
    return Verified(len(warmup), len(signatures), float_diff, int_diff)
