"""The models a server holds: versions on disk, their signatures, and what a request may send them.

A `ModelRegistry` mirrors TF Serving's model manager for the embedded server: every model of a
`ModelServerConfig` is a base path whose numeric subdirectories are versions; the version policy
(latest N by default, all, or specific) says which are loaded; a poll thread picks up new versions
and drops old ones. A version is loaded and run the way TF Serving runs it: C++ LoadSavedModel
and one Session::Run per request on the SignatureDef's tensor names, with the output_filter as
the fetch list (export/tfs_loader.py). Requests are checked as TF Serving checks them (input
names, dtypes, output names); shapes and batch sizes are checked by the graph itself, and the
graph's errors keep TensorFlow's status code.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import math
import os
import re
import threading
import time
from typing import Callable, Iterable, Mapping, Sequence

import grpc
import numpy as np
import tensorflow as tf
from tensorflow.core.framework import tensor_pb2, types_pb2
from tensorflow.core.protobuf import meta_graph_pb2
from tensorflow_serving.apis import get_model_metadata_pb2, model_pb2
from tensorflow_serving.config import model_server_config_pb2

from export.tfs_loader import SavedModelSession, SessionError, warmup_requests

log = logging.getLogger("serving.models")

DEFAULT_SIGNATURE = "serving_default"
INIT_OP_SIGNATURE = "__saved_model_init_op"  # in the SignatureDef map of TF2 SavedModels; not servable
MAX_LOAD_ATTEMPTS = 5  # like TF Serving's --max_num_load_retries
# TF's TensorProto shorthand: fewer values than the shape holds repeats the last one (none: zeros).
# A few bytes on the wire could then ask for gigabytes, so the expansion is capped.
MAX_FILL_BYTES = 64 * 2**20
_VALUE_FIELDS = ("half_val", "float_val", "double_val", "int_val", "string_val", "scomplex_val", "int64_val",
                 "bool_val", "dcomplex_val", "resource_handle_val", "variant_val", "uint32_val", "uint64_val")


class ServingError(Exception):
    """An error with the gRPC status code TF Serving would answer."""

    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(message)
        self.code = code
        self.message = message


def clean_tf_message(message: str) -> str:
    """Turn a TF runtime error message into one readable line.

    Drops the "Graph execution error" preamble, node and function annotations and tensor names,
    and joins the bracketed pieces of an assertion ("[class_index out of range] [x = ] [7]").
    """
    lines = [
        line
        for line in message.splitlines()
        if line.strip()
        and line.strip() not in ("Graph execution error:", "<stack traces unavailable>")
        and not line.startswith("Detected at node")
        and not line.lstrip().startswith("[[{{")
    ]
    text = " ".join(lines)
    text = re.sub(r"\s*\[Op:[^\]]*\]", "", text)
    text = re.sub(r"\s*\[\[\{\{[^\]]*\]\]", "", text)
    text = re.sub(r" \([\w/.:-]+:\d+\)", "", text)  # tensor names: "x (class_index:0) ="
    prefix = "assertion failed: "
    if text.startswith(prefix + "["):  # (not again on a message cleaned before)
        pieces = _bracket_groups(text[len(prefix):])
        if pieces:
            out = pieces[0]
            for previous, piece in zip(pieces, pieces[1:]):
                if previous.endswith("="):  # a value: keep a vector recognisable
                    out += " " + (f"[{piece}]" if " " in piece else piece)
                else:
                    out += (" " if previous.endswith(":") else "; ") + piece
            text = prefix + out
    return re.sub(r"\s+", " ", text).strip()


def _bracket_groups(text: str) -> list[str]:
    """Top-level "[...]" groups of an Assert message, their contents stripped."""
    groups, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        if ch == "[":
            if depth == 0:
                start = i + 1
            depth += 1
        elif ch == "]" and depth:
            depth -= 1
            if depth == 0:
                groups.append(text[start:i].strip())
    return [g for g in groups if g]


def _shape_text(shape: Iterable[int | None]) -> str:
    return "[" + ",".join("-1" if d is None else str(d) for d in shape) + "]"


def _dtype_name(enum: int) -> str:
    try:
        return tf.dtypes.as_dtype(enum).name
    except TypeError:
        return types_pb2.DataType.Name(enum) if enum in types_pb2.DataType.values() else f"invalid dtype {enum}"


def decode_tensor(name: str, proto: tensor_pb2.TensorProto, max_bytes: int) -> np.ndarray:
    """A request TensorProto as a numpy array, refusing malformed or oversized tensors."""
    if proto.tensor_shape.unknown_rank:
        raise ServingError(grpc.StatusCode.INVALID_ARGUMENT, f"input '{name}': the tensor has no shape")
    dims = [d.size for d in proto.tensor_shape.dim]
    if any(d < 0 for d in dims):
        raise ServingError(grpc.StatusCode.INVALID_ARGUMENT, f"input '{name}': negative dimension in shape {dims}")
    count = math.prod(dims)
    dtype = tf.dtypes.as_dtype(proto.dtype)
    if dtype != tf.string:
        nbytes = count * dtype.size
        if nbytes > max_bytes:
            raise ServingError(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"input '{name}': shape {_shape_text(dims)} is {nbytes} bytes, more than the {max_bytes} allowed",
            )
        sent = sum(len(getattr(proto, field)) for field in _VALUE_FIELDS if hasattr(proto, field))
        if not proto.tensor_content and sent < count and nbytes > MAX_FILL_BYTES:
            raise ServingError(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"input '{name}': shape {_shape_text(dims)} holds {count} values ({nbytes} bytes) but the request "
                f"carries {sent}; filling a tensor from fewer values is allowed up to {MAX_FILL_BYTES} bytes",
            )
        if proto.tensor_content and len(proto.tensor_content) != nbytes:
            raise ServingError(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"input '{name}': tensor_content has {len(proto.tensor_content)} bytes; "
                f"shape {_shape_text(dims)} of {dtype.name} needs {nbytes}",
            )
    elif len(proto.string_val) != count:
        raise ServingError(
            grpc.StatusCode.INVALID_ARGUMENT,
            f"input '{name}': {len(proto.string_val)} strings for shape {_shape_text(dims)}",
        )
    try:
        array = tf.make_ndarray(proto)
    except Exception as e:  # malformed content: tell the client, do not crash
        raise ServingError(grpc.StatusCode.INVALID_ARGUMENT, f"input '{name}': cannot decode the tensor: {e}") from None
    return array


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


# Packed repeated fields of TensorProto whose wire bytes are the little-endian array itself.
_RAW_FIELDS = {np.dtype(np.float32): (5, "<f4"), np.dtype(np.float64): (6, "<f8")}
_LIST_FIELDS = {
    np.dtype(np.int8): "int_val", np.dtype(np.int16): "int_val", np.dtype(np.int32): "int_val",
    np.dtype(np.uint8): "int_val", np.dtype(np.uint16): "int_val", np.dtype(np.int64): "int64_val",
    np.dtype(np.uint32): "uint32_val", np.dtype(np.uint64): "uint64_val", np.dtype(np.bool_): "bool_val",
}


def encode_tensor(array: np.ndarray, as_tensor_content: bool = False) -> tensor_pb2.TensorProto:
    """A response TensorProto the way TF Serving writes it.

    TF Serving's default (`--enable_serialization_as_tensor_content=false`) puts values in the typed
    repeated fields (`float_val`, `int_val`, `string_val`...), not `tensor_content`; clients must
    read both, and answering the same way here keeps a client that reads only one form honest.
    """
    array = np.asarray(array)
    if as_tensor_content or array.dtype.kind in "OSU" or array.dtype not in (*_RAW_FIELDS, *_LIST_FIELDS):
        return tf.make_tensor_proto(array)
    proto = tensor_pb2.TensorProto(dtype=tf.dtypes.as_dtype(array.dtype).as_datatype_enum)
    for size in array.shape:
        proto.tensor_shape.dim.add(size=size)
    if array.size == 0:
        return proto
    if array.dtype in _RAW_FIELDS:
        number, little_endian = _RAW_FIELDS[array.dtype]
        data = np.ascontiguousarray(array, dtype=little_endian).tobytes()
        proto.MergeFromString(_varint(number << 3 | 2) + _varint(len(data)) + data)
    else:
        getattr(proto, _LIST_FIELDS[array.dtype]).extend(array.ravel().tolist())
    return proto


def _grpc_code(code: int) -> grpc.StatusCode:
    """The grpc.StatusCode of a TF_Code number (TensorFlow's codes are gRPC's)."""
    return next((c for c in grpc.StatusCode if c.value[0] == code), grpc.StatusCode.UNKNOWN)


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
        """It returns a heatmap (an explain signature, not predict)."""
        return "heatmap" in self.outputs or "heatmap_uint8" in self.outputs

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

    def decode_inputs(self, protos: Mapping[str, tensor_pb2.TensorProto], max_bytes: int) -> tuple[dict[str, np.ndarray], int | None]:
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
                    f"input '{name}' of signature '{self.name}': expected dtype {_dtype_name(info.dtype)}, "
                    f"got {_dtype_name(proto.dtype)}",
                )
            arrays[name] = decode_tensor(name, proto, max_bytes)
        sizes = {a.shape[0] if a.ndim else None for a in arrays.values()}
        return arrays, sizes.pop() if len(sizes) == 1 else None

    def run(self, inputs: Mapping[str, np.ndarray], outputs: tuple[str, ...] | None = None) -> dict[str, np.ndarray]:
        """One Session::Run fetching `outputs` (None: all); TensorFlow's status code is kept."""
        aliases = list(outputs or self.outputs)
        try:
            fetched = self._session.run({self.inputs[k].name: v for k, v in inputs.items()},
                                        [self.outputs[a].name for a in aliases])
        except SessionError as e:
            raise ServingError(_grpc_code(e.code), clean_tf_message(e.message)) from None
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
    def load(cls, model_name: str, version: int, path: str) -> "ModelVersion":
        session = SavedModelSession(path)
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
        for request in warmup_requests(self.path):
            signature = self.signature(request.model_spec.signature_name)
            outputs = signature.check_output_filter(request.output_filter)
            inputs, _ = signature.decode_inputs(request.inputs, max_bytes)
            signature.run(inputs, outputs)
            count += 1
        return count


def numeric_versions(base_path: str) -> dict[int, str]:
    """Version number -> directory name of the numeric subdirectories of a base path.

    As TF Serving's file system source: a name made of digits is a version, leading zeros
    included ("00000123" is version 123); other names are ignored.
    """
    try:
        entries = os.listdir(base_path)
    except OSError:
        return {}
    found = {int(e): e for e in sorted(entries)
             if e.isascii() and e.isdigit() and os.path.isdir(os.path.join(base_path, e))}
    return dict(sorted(found.items()))


def _has_saved_model(path: str) -> bool:
    return any(os.path.isfile(os.path.join(path, f)) for f in ("saved_model.pb", "saved_model.pbtxt"))


def _disk_state(path: str) -> tuple:
    """What a version directory holds (names, sizes, modification times): a failed load is retried
    only once this changes, e.g. when a half-written copy completes."""
    state = []
    for root, _, files in os.walk(path):
        for name in files:
            try:
                info = os.stat(os.path.join(root, name))
            except OSError:
                continue
            state.append((os.path.relpath(os.path.join(root, name), path), info.st_size, info.st_mtime_ns))
    return tuple(sorted(state))


def aspired_versions(config: model_server_config_pb2.ModelConfig, on_disk: Sequence[int]) -> list[int]:
    """The versions the model's version policy wants loaded (default: the latest one)."""
    policy = config.model_version_policy
    kind = policy.WhichOneof("policy_choice")
    if kind == "all":
        return list(on_disk)
    if kind == "specific":
        return [v for v in on_disk if v in set(policy.specific.versions)]
    count = policy.latest.num_versions if kind == "latest" and policy.latest.num_versions > 0 else 1
    return list(on_disk)[-count:]


@dataclasses.dataclass(frozen=True)
class VersionState:
    """A version's state as GetModelStatus reports it (TF Serving's ModelVersionStatus)."""

    state: str  # LOADING, AVAILABLE, UNLOADING, END (TF Serving's names)
    code: grpc.StatusCode = grpc.StatusCode.OK  # a failed load: its error, with state END
    message: str = ""


def _error_code(error: BaseException) -> grpc.StatusCode:
    if isinstance(error, ServingError):
        return error.code
    if isinstance(error, SessionError):
        return _grpc_code(error.code)
    return grpc.StatusCode.UNKNOWN


class _Model:
    def __init__(self, config: model_server_config_pb2.ModelConfig):
        self.config = config
        self.versions: dict[int, ModelVersion] = {}  # replaced, never mutated: readers need no lock
        self.states: dict[int, VersionState] = {}  # every version this server has seen, as reported
        self.failures: collections.Counter[int] = collections.Counter()
        self.failed_state: dict[int, tuple] = {}  # what the directory held at the last failed load
        self.incomplete: set[int] = set()  # directories without saved_model.pb (logged once)
        self.warned_empty = False


class ModelRegistry:
    """The models of a ModelServerConfig and their loaded versions, with TF Serving's version states."""

    def __init__(self, config: model_server_config_pb2.ModelServerConfig, warmup: bool = True,
                 max_bytes: int = 2**31 - 1, on_load: Callable[[str, bool], None] | None = None):
        _check_config(config)
        self._models = {m.name: _Model(m) for m in config.model_config_list.config}  # replaced on reload
        self._warmup = warmup
        self._max_bytes = max_bytes
        self._on_load = on_load  # told of every load attempt: (path, succeeded), for metrics
        self._retired: dict[str, dict[int, VersionState]] = {}  # states of models a reload removed
        self._sync_lock = threading.Lock()
        self._stop = threading.Event()
        self._poller: threading.Thread | None = None

    @property
    def model_names(self) -> list[str]:
        return list(self._models)

    def sync(self) -> list[str]:
        """Load the versions the policies want and that are not loaded yet; unload the others.

        Returns the loads that failed in this pass ("model M version V: cause").
        """
        with self._sync_lock:
            return [error for name, model in self._models.items() for error in self._sync_model(name, model)]

    def reload(self, config: model_server_config_pb2.ModelServerConfig) -> list[str]:
        """Serve exactly the models of `config` (TF Serving's ReloadConfig): new models are loaded,
        models no longer listed are unloaded, a changed base path or policy takes effect.
        Returns the loads that failed, as `sync`."""
        _check_config(config)
        with self._sync_lock:
            models = {}
            for new in config.model_config_list.config:
                model = self._models.get(new.name)
                if model is None or model.config.base_path != new.base_path:
                    # TF Serving's state monitor never forgets a version: neither do we.
                    seen = model.states if model is not None else self._retired.pop(new.name, {})
                    model = _Model(new)
                    model.states = dict(seen)
                model.config = new
                models[new.name] = model
            # Load first, then publish: a model keeps being served until its replacement is loaded.
            errors = [error for name, model in models.items() for error in self._sync_model(name, model)]
            for name, model in self._models.items():
                if models.get(name) is not model:
                    self._unload_all(name, model)
                    if name not in models:
                        self._retired[name] = model.states
            self._models = models
            return errors

    @staticmethod
    def _set_state(model: _Model, version: int, state: VersionState) -> None:
        model.states = {**model.states, version: state}

    def all_states(self) -> list[tuple[str, int, str]]:
        """(model, version, state) of every version known: the metrics' view."""
        return [(name, version, state.state) for name, model in self._models.items()
                for version, state in sorted(model.states.items())]

    def _unload(self, name: str, model: _Model, version: int) -> None:
        self._set_state(model, version, VersionState("UNLOADING"))
        model.versions = {v: loaded for v, loaded in model.versions.items() if v != version}
        self._set_state(model, version, VersionState("END"))
        log.info("unloaded model %s version %d", name, version)

    def _unload_all(self, name: str, model: _Model) -> None:
        for version in sorted(model.versions):
            self._unload(name, model, version)

    def _sync_model(self, name: str, model: _Model) -> list[str]:
        base_path = model.config.base_path
        on_disk = numeric_versions(base_path)
        wanted = aspired_versions(model.config, list(on_disk))
        if not wanted and not model.versions and not model.warned_empty:
            log.warning("No versions of servable %s found under base path %s", name, base_path)
            model.warned_empty = True
        errors = []
        for version in wanted:
            if version in model.versions:
                continue
            path = os.path.join(base_path, on_disk[version])
            if not _has_saved_model(path):  # being written, or not a SavedModel: look again next poll
                if version not in model.incomplete:
                    model.incomplete.add(version)
                    log.warning("model %s version %d: %s has no saved_model.pb (still being written?): not loaded",
                                name, version, path)
                continue
            if model.failures[version] >= MAX_LOAD_ATTEMPTS:
                if model.failed_state.get(version) == _disk_state(path):
                    continue
                log.info("model %s version %d changed on disk since it failed to load: trying again", name, version)
                model.failures[version] = 0
            started = time.perf_counter()
            self._set_state(model, version, VersionState("LOADING"))
            try:
                loaded = ModelVersion.load(name, version, path)
                warmed = loaded.warm_up(self._max_bytes) if self._warmup else 0
            except Exception as e:
                model.failures[version] += 1
                model.failed_state[version] = _disk_state(path)
                if self._on_load is not None:
                    self._on_load(path, False)
                message = clean_tf_message(str(e))[:500]
                self._set_state(model, version, VersionState("END", _error_code(e), message))
                serving = sorted(model.versions)
                log.error("failed to load model %s version %d from %s (attempt %d of %d; %s): %s",
                          name, version, path, model.failures[version], MAX_LOAD_ATTEMPTS,
                          f"still serving version {serving[-1]}" if serving else "no version is served", message)
                errors.append(f"model {name} version {version}: {message}")
                continue
            model.versions = {**model.versions, version: loaded}
            if self._on_load is not None:
                self._on_load(path, True)
            self._set_state(model, version, VersionState("AVAILABLE"))
            model.warned_empty = False
            log.info("loaded model %s version %d from %s in %.1f s (signatures: %s; %d warm-up requests)",
                     name, version, path, time.perf_counter() - started, ", ".join(loaded.signatures), warmed)
        # Unload what is no longer wanted, but keep serving the newest old version until a wanted
        # one is loaded (TF Serving's availability-preserving policy).
        stale = sorted(v for v in model.versions if v not in wanted)
        if stale and not any(v in model.versions for v in wanted):
            stale = stale[:-1]
        for version in stale:
            self._unload(name, model, version)
        return errors

    def start_polling(self, interval_seconds: float) -> None:
        """Look for new versions every `interval_seconds` (TF Serving's file system poll)."""
        if interval_seconds <= 0:
            return

        def poll() -> None:
            while not self._stop.wait(interval_seconds):
                try:
                    self.sync()
                except Exception:  # keep polling whatever happens to one pass
                    log.exception("polling the model base paths failed")

        self._poller = threading.Thread(target=poll, name="version-poller", daemon=True)
        self._poller.start()

    def stop(self) -> None:
        self._stop.set()
        if self._poller:
            self._poller.join(timeout=5)

    def _lookup(self, spec: model_pb2.ModelSpec) -> tuple[_Model | None, int | None]:
        """The model a ModelSpec names (None if unknown) and the version it asks for (None: latest)."""
        model = self._models.get(spec.name)
        if model is None:
            return None, None
        if spec.HasField("version"):
            return model, spec.version.value
        if spec.version_label:
            labels = model.config.version_labels
            if spec.version_label not in labels:
                raise ServingError(grpc.StatusCode.INVALID_ARGUMENT, f"Unrecognized servable version label: {spec.version_label}")
            return model, labels[spec.version_label]
        return model, None

    def resolve(self, spec: model_pb2.ModelSpec) -> ModelVersion:
        """The loaded version a request's ModelSpec names (latest when none), or NOT_FOUND."""
        model, version = self._lookup(spec)
        versions = model.versions if model is not None else {}
        if version is None:
            if not versions:
                raise ServingError(grpc.StatusCode.NOT_FOUND, f"Servable not found for request: Latest({spec.name})")
            return versions[max(versions)]
        if version not in versions:
            raise ServingError(grpc.StatusCode.NOT_FOUND, f"Servable not found for request: Specific({spec.name}, {version})")
        return versions[version]

    def states(self, spec: model_pb2.ModelSpec) -> list[tuple[int, VersionState]]:
        """Every version of a model this server knows, newest first (one if the spec names it),
        with its state: GetModelStatus."""
        model, version = self._lookup(spec)
        states = model.states if model is not None else self._retired.get(spec.name, {})
        if version is None:
            if not states:
                raise ServingError(grpc.StatusCode.NOT_FOUND, f"Could not find any versions of model {spec.name}")
            return sorted(states.items(), reverse=True)
        if version not in states:
            raise ServingError(grpc.StatusCode.NOT_FOUND, f"Could not find version {version} of model {spec.name}")
        return [(version, states[version])]


def _check_config(config: model_server_config_pb2.ModelServerConfig) -> None:
    """Refuse what TF Serving refuses in a ModelServerConfig before anything is loaded."""
    if config.WhichOneof("config") == "custom_model_config":
        raise ServingError(grpc.StatusCode.INVALID_ARGUMENT, "only model_config_list is supported (no custom_model_config)")
    names = [m.name for m in config.model_config_list.config]
    for m in config.model_config_list.config:
        if not m.name or not m.base_path:
            raise ServingError(grpc.StatusCode.INVALID_ARGUMENT, f"model config {m.name or '(no name)'}: "
                               "name and base_path are required")
        if names.count(m.name) > 1:
            raise ServingError(grpc.StatusCode.INVALID_ARGUMENT, f"Illegal to list model {m.name} multiple times in config list")
