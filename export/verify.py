"""Prove that TensorFlow Serving's loader runs a staged version before it is published.

`tf.saved_model.load` rebuilds the TF2 object graph and can run a model that TF Serving cannot
(variables captured by a function but not tracked by the saved object are not restored by the
saver: "Could not find variable ..."). So the exporter loads the staged directory the way TF Serving
does (serving/servables/session.py: LoadSavedModel + Session::Run), replays its whole warm-up file with
each record's output_filter as the fetch list, as TF Serving does before it serves a version, calls
each alias of a warmed signature (signature_defs.py) for all its outputs, which runs on the same
executor, and compares every output with the TF2 function that was saved. So the check builds the
executors the server builds at start, and no more. Any failure raises VerificationError, and the
version directory never appears. The signatures that nobody calls by default are run through the
same loader by the tests (tests/test_every_signature.py).
"""

from __future__ import annotations

import dataclasses
import pathlib
from typing import Mapping

import numpy as np
import tensorflow as tf

from camserve.serving.servables.session import SavedModelSession, SessionError
from camserve.serving.servables.warmup import read_warmup_requests

# Session::Run and the TF2 function runtime run the same kernels; float outputs may still differ
# in the last bits where graph rewrites (op fusion) change the order of a sum.
FLOAT_TOLERANCE = 1e-4  # relative to the output's largest magnitude (at least 1)


class VerificationError(RuntimeError):
    """The staged model does not run, or runs differently, under TF Serving's loader."""


@dataclasses.dataclass
class Verified:
    requests: int
    aliases: int
    max_float_diff: float  # largest relative difference of a float output from the TF2 function
    max_int_diff: int  # largest difference of an integer output (e.g. heatmap_uint8 at a rounding edge)

    def __str__(self) -> str:
        return (
            f"verified with TensorFlow Serving's loader (LoadSavedModel + Session::Run): {self.requests} warm-up "
            f"requests and every output of {self.aliases} aliases, outputs equal to the TF2 functions "
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


def verify(export_dir: str | pathlib.Path, signatures: Mapping[str, tf.types.experimental.ConcreteFunction],
           aliases: Mapping[str, str] | None = None, config: bytes = b"") -> Verified:
    """Load `export_dir` with TF Serving's loader (and the session `config` the server runs with), replay
    its warm-up, then run each alias (alias -> target) of a replayed target on the target's first
    record, for every output; compare every output with `signatures`' TF2 functions."""
    try:
        session = SavedModelSession(export_dir, config=config)
    except SessionError as error:
        raise VerificationError(f"TensorFlow Serving's loader cannot load the model: {error}") from None
    with session:
        missing = set(signatures) - set(session.signature_defs)
        if missing:
            raise VerificationError(f"signatures {sorted(missing)} are not in the saved MetaGraph")
        warmup = list(read_warmup_requests(export_dir))
        calls = [(r.model_spec.signature_name, r.model_spec.signature_name,
                  {k: tf.make_ndarray(v) for k, v in r.inputs.items()}, list(r.output_filter)) for r in warmup]
        first = {}  # signature -> the inputs of its first record
        for name, _, inputs, _ in calls:
            first.setdefault(name, inputs)
        checked = {alias: target for alias, target in (aliases or {}).items() if target in first}
        calls += [(alias, target, first[target], []) for alias, target in checked.items()]
        expected_cache: dict = {}
        float_diff, int_diff = 0.0, 0
        for name, target, inputs, output_filter in calls:
            try:
                served = session.run_signature(name, inputs, output_filter)
            except SessionError as error:
                raise VerificationError(f"TensorFlow Serving's loader cannot run signature {name!r}: {error}") from None
            key = (target, tuple(sorted((k, v.shape, v.tobytes()) for k, v in inputs.items())))
            if key not in expected_cache:
                expected_cache[key] = signatures[target](**{k: tf.constant(v) for k, v in inputs.items()})
            expected = expected_cache[key]
            if not output_filter and not set(served) <= set(expected):
                raise VerificationError(f"signature {name!r} returns {sorted(served)} under TF Serving's loader, "
                                        f"{sorted(expected)} from the TF2 function of {target!r}")
            for alias, value in served.items():
                f, i = difference(alias, value, expected[alias].numpy())
                float_diff, int_diff = max(float_diff, f), max(int_diff, i)
    return Verified(len(warmup), len(checked), float_diff, int_diff)
