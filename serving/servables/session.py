"""Run a SavedModel the way TensorFlow Serving does: C++ `LoadSavedModel`, then `Session::Run`.

TF Serving never sees the TF2 object graph that `tf.saved_model.load` rebuilds. It loads the
MetaGraph tagged `serve`, restores the variables with the saver's restore op, runs the init op, and
answers each request with one `Session::Run` that feeds and fetches the SignatureDef's tensor names
(a request's output_filter only shortens the fetch list). TensorFlow's wheel exposes that same
loader through its C API (`TF_LoadSessionFromSavedModel`, `TF_SessionRun`), reached here with
ctypes, so a model that runs here runs in TF Serving, and one that fails here fails there.

Errors come back as `SessionError` with TensorFlow's status code, whose numbers are gRPC's.
"""

from __future__ import annotations

import ctypes
import importlib.util
import pathlib
import threading
from typing import Mapping, Sequence

import numpy as np
from tensorflow.core.protobuf import config_pb2, error_codes_pb2, meta_graph_pb2

SERVE_TAG = "serve"
TSTRING_BYTES = 24  # sizeof(TF_TString)
TF_STRING = 7
# TF_DataType -> numpy dtype (the enum values are those of tensorflow/core/framework/types.proto).
NUMPY_DTYPES = {
    1: np.float32, 2: np.float64, 3: np.int32, 4: np.uint8, 5: np.int16, 6: np.int8, 9: np.int64,
    10: np.bool_, 17: np.uint16, 19: np.float16, 22: np.uint32, 23: np.uint64,
}
TF_DTYPES = {np.dtype(v): k for k, v in NUMPY_DTYPES.items()}


class SessionError(Exception):
    """A TensorFlow status that is not OK: `code` is the TF_Code (= gRPC status code number)."""

    def __init__(self, code: int, message: str):
        name = error_codes_pb2.Code.Name(code) if code in error_codes_pb2.Code.values() else str(code)
        super().__init__(f"{name}: {message}")
        self.code = code
        self.message = message


class _Buffer(ctypes.Structure):
    _fields_ = [("data", ctypes.c_void_p), ("length", ctypes.c_size_t), ("data_deallocator", ctypes.c_void_p)]


class _Output(ctypes.Structure):
    _fields_ = [("oper", ctypes.c_void_p), ("index", ctypes.c_int)]


_P = ctypes.c_void_p
# name: (library, result type, argument types)
_SIGNATURES = {
    "TF_NewStatus": ("framework", _P, []),
    "TF_DeleteStatus": ("framework", None, [_P]),
    "TF_GetCode": ("framework", ctypes.c_int, [_P]),
    "TF_Message": ("framework", ctypes.c_char_p, [_P]),
    "TF_NewBuffer": ("framework", ctypes.POINTER(_Buffer), []),
    "TF_DeleteBuffer": ("framework", None, [ctypes.POINTER(_Buffer)]),
    "TF_AllocateTensor": (
        "framework",
        _P,
        [ctypes.c_int, ctypes.POINTER(ctypes.c_int64), ctypes.c_int, ctypes.c_size_t],
    ),
    "TF_DeleteTensor": ("framework", None, [_P]),
    "TF_TensorType": ("framework", ctypes.c_int, [_P]),
    "TF_NumDims": ("framework", ctypes.c_int, [_P]),
    "TF_Dim": ("framework", ctypes.c_int64, [_P, ctypes.c_int]),
    "TF_TensorByteSize": ("framework", ctypes.c_size_t, [_P]),
    "TF_TensorData": ("framework", _P, [_P]),
    "TF_StringInit": ("cc", None, [_P]),
    "TF_StringAssignView": ("cc", None, [_P, ctypes.c_char_p, ctypes.c_size_t]),
    "TF_StringGetDataPointer": ("cc", _P, [_P]),
    "TF_StringGetSize": ("cc", ctypes.c_size_t, [_P]),
    "TF_NewGraph": ("cc", _P, []),
    "TF_DeleteGraph": ("cc", None, [_P]),
    "TF_NewSessionOptions": ("cc", _P, []),
    "TF_DeleteSessionOptions": ("cc", None, [_P]),
    "TF_SetConfig": ("cc", None, [_P, ctypes.c_char_p, ctypes.c_size_t, _P]),
    "TF_LoadSessionFromSavedModel": (
        "cc",
        _P,
        [_P, _P, ctypes.c_char_p, ctypes.POINTER(ctypes.c_char_p), ctypes.c_int, _P, ctypes.POINTER(_Buffer), _P],
    ),
    "TF_GraphOperationByName": ("cc", _P, [_P, ctypes.c_char_p]),
    "TF_SessionRun": (
        "cc",
        None,
        [
            _P,
            _P,
            ctypes.POINTER(_Output),
            ctypes.POINTER(_P),
            ctypes.c_int,
            ctypes.POINTER(_Output),
            ctypes.POINTER(_P),
            ctypes.c_int,
            _P,
            ctypes.c_int,
            _P,
            _P,
        ],
    ),
    "TF_CloseSession": ("cc", None, [_P, _P]),
    "TF_DeleteSession": ("cc", None, [_P, _P]),
}


class _CApi:
    """The C API functions, typed, from the libraries beside the installed `tensorflow` package."""

    def __init__(self):
        spec = importlib.util.find_spec("tensorflow")
        if spec is None or not spec.submodule_search_locations:
            raise ImportError("the tensorflow package is not installed")
        folder = pathlib.Path(spec.submodule_search_locations[0])
        libraries = {
            "framework": ctypes.CDLL(str(folder / "libtensorflow_framework.so.2")),
            "cc": ctypes.CDLL(str(folder / "libtensorflow_cc.so.2")),
        }
        for name, (library, result, arguments) in _SIGNATURES.items():
            function = getattr(libraries[library], name)
            function.restype, function.argtypes = result, arguments
            setattr(self, name, function)

    def check(self, status) -> None:
        code = self.TF_GetCode(status)
        if code:
            raise SessionError(code, self.TF_Message(status).decode("utf-8", "replace"))


_api: _CApi | None = None
_api_lock = threading.Lock()


def c_api() -> _CApi:
    global _api
    with _api_lock:
        if _api is None:
            _api = _CApi()
        return _api


class _Status:
    def __init__(self, api: _CApi):
        self.api = api
        self.handle = api.TF_NewStatus()

    def __enter__(self):
        return self.handle

    def __exit__(self, *exc) -> None:
        self.api.TF_DeleteStatus(self.handle)


def _to_tensor(api: _CApi, value: np.ndarray, keep: list) -> int:
    """A TF_Tensor holding `value`. Strings are views of the bytes objects kept in `keep`, which
    must outlive the run (TF_TString views own nothing, so deleting the tensor frees no string)."""
    array = np.asarray(value)
    dims = (ctypes.c_int64 * array.ndim)(*array.shape)
    if array.dtype.kind in "OSU":
        items = [v if isinstance(v, bytes) else str(v).encode() for v in array.ravel()]
        tensor = api.TF_AllocateTensor(TF_STRING, dims, array.ndim, TSTRING_BYTES * len(items))
        base = api.TF_TensorData(tensor)
        for i, item in enumerate(items):
            api.TF_StringInit(base + i * TSTRING_BYTES)
            api.TF_StringAssignView(base + i * TSTRING_BYTES, item, len(item))
        keep.append(items)
        return tensor
    if array.dtype not in TF_DTYPES:
        raise SessionError(3, f"dtype {array.dtype} cannot be fed through the C API")
    array = np.asarray(array, order="C")  # (np.ascontiguousarray would make a scalar 1-D)
    tensor = api.TF_AllocateTensor(TF_DTYPES[array.dtype], dims, array.ndim, array.nbytes)
    if array.nbytes:
        ctypes.memmove(api.TF_TensorData(tensor), array.ctypes.data, array.nbytes)
    return tensor


def _from_tensor(api: _CApi, tensor: int) -> np.ndarray:
    """A numpy copy of a TF_Tensor (bytes objects for strings)."""
    shape = tuple(api.TF_Dim(tensor, i) for i in range(api.TF_NumDims(tensor)))
    dtype = api.TF_TensorType(tensor)
    data = api.TF_TensorData(tensor)
    if dtype == TF_STRING:
        count = int(np.prod(shape, dtype=np.int64))
        items = np.empty(count, dtype=object)
        for i in range(count):
            element = data + i * TSTRING_BYTES
            items[i] = ctypes.string_at(api.TF_StringGetDataPointer(element), api.TF_StringGetSize(element))
        return items.reshape(shape)
    if dtype not in NUMPY_DTYPES:
        raise SessionError(12, f"output of TF_DataType {dtype} cannot be read through the C API")
    array = np.empty(shape, NUMPY_DTYPES[dtype])
    if array.nbytes:
        ctypes.memmove(array.ctypes.data, data, array.nbytes)
    return array


class SavedModelSession:
    """One SavedModel loaded with TF_LoadSessionFromSavedModel; `run` is one TF_SessionRun.

    Safe to call from several threads at once (TF sessions are); the GIL is released while
    TensorFlow runs.
    """

    def __init__(self, export_dir: str | pathlib.Path, tags: Sequence[str] = (SERVE_TAG,), config: bytes = b""):
        """`config`: a serialized tensorflow.ConfigProto for the session (TF Serving builds one from its
        flags, e.g. --per_process_gpu_memory_fraction), such as log_device_placement=True."""
        api = self.api = c_api()
        self.export_dir = str(export_dir)
        self.graph = api.TF_NewGraph()
        options = api.TF_NewSessionOptions()
        meta_graph = api.TF_NewBuffer()
        self.session = None
        try:
            if config:
                with _Status(api) as status:
                    api.TF_SetConfig(options, config, len(config), status)
                    api.check(status)
            with _Status(api) as status:
                tag_array = (ctypes.c_char_p * len(tags))(*[t.encode() for t in tags])
                self.session = api.TF_LoadSessionFromSavedModel(
                    options, None, self.export_dir.encode(), tag_array, len(tags), self.graph, meta_graph, status
                )
                api.check(status)
            buffer = meta_graph.contents
            self.meta_graph = meta_graph_pb2.MetaGraphDef.FromString(ctypes.string_at(buffer.data, buffer.length))
        except BaseException:
            self.close()
            raise
        finally:
            api.TF_DeleteBuffer(meta_graph)
            api.TF_DeleteSessionOptions(options)
        self._outputs: dict[str, _Output] = {}
        self._lock = threading.Lock()

    @property
    def signature_defs(self) -> Mapping[str, meta_graph_pb2.SignatureDef]:
        return self.meta_graph.signature_def

    def _output(self, tensor_name: str) -> _Output:
        """The TF_Output of "op_name:index" (cached)."""
        with self._lock:
            if tensor_name not in self._outputs:
                op_name, _, index = tensor_name.rpartition(":")
                operation = self.api.TF_GraphOperationByName(self.graph, op_name.encode())
                if not operation:
                    raise SessionError(5, f"tensor {tensor_name!r} is not in the graph")
                self._outputs[tensor_name] = _Output(operation, int(index))
            return self._outputs[tensor_name]

    def run(
        self,
        feeds: Mapping[str, np.ndarray],
        fetches: Sequence[str],
        options: config_pb2.RunOptions | None = None,
        metadata: config_pb2.RunMetadata | None = None,
    ) -> list[np.ndarray]:
        """One Session::Run: feed tensors by name ("op:0"), return the fetched ones as numpy arrays.
        As tf.compat.v1.Session.run: `options` (e.g. a trace) for this run, `metadata` filled in."""
        if self.session is None:
            raise SessionError(9, "the session is closed")
        api = self.api
        names = list(feeds)
        inputs = (_Output * len(names))(*[self._output(n) for n in names])
        outputs = (_Output * len(fetches))(*[self._output(n) for n in fetches])
        keep: list = []
        input_values = (_P * len(names))()
        output_values = (_P * len(fetches))()
        serialized = options.SerializeToString() if options is not None else None  # kept alive for the run
        options_buffer = (
            _Buffer(ctypes.cast(ctypes.c_char_p(serialized), _P), len(serialized), None) if serialized else None
        )
        metadata_buffer = api.TF_NewBuffer() if metadata is not None else None
        try:
            for i, name in enumerate(names):
                input_values[i] = _to_tensor(api, feeds[name], keep)
            with _Status(api) as status:
                api.TF_SessionRun(
                    self.session,
                    ctypes.addressof(options_buffer) if options_buffer is not None else None,
                    inputs,
                    input_values,
                    len(names),
                    outputs,
                    output_values,
                    len(fetches),
                    None,
                    0,
                    ctypes.cast(metadata_buffer, _P) if metadata_buffer else None,
                    status,
                )
                api.check(status)
            if metadata_buffer:
                metadata.MergeFromString(
                    ctypes.string_at(metadata_buffer.contents.data, metadata_buffer.contents.length)
                )
            return [_from_tensor(api, output_values[i]) for i in range(len(fetches))]
        finally:
            if metadata_buffer:
                api.TF_DeleteBuffer(metadata_buffer)
            for tensor in (*input_values, *output_values):
                if tensor:
                    api.TF_DeleteTensor(tensor)

    def run_signature(
        self,
        name: str,
        inputs: Mapping[str, np.ndarray],
        output_filter: Sequence[str] = (),
        options: config_pb2.RunOptions | None = None,
        metadata: config_pb2.RunMetadata | None = None,
    ) -> dict[str, np.ndarray]:
        """Run a signature the way TF Serving's Predict does: inputs by alias, outputs by alias
        (all of them, or the output_filter)."""
        if name not in self.signature_defs:
            raise SessionError(9, f'Serving signature key "{name}" not found.')
        signature = self.signature_defs[name]
        unknown = set(inputs) ^ set(signature.inputs)
        if unknown:
            raise SessionError(3, f"inputs of signature {name!r} are {sorted(signature.inputs)}; got {sorted(inputs)}")
        aliases = list(output_filter) or list(signature.outputs)
        fetched = self.run(
            {signature.inputs[k].name: v for k, v in inputs.items()},
            [signature.outputs[a].name for a in aliases],
            options,
            metadata,
        )
        return dict(zip(aliases, fetched))

    def close(self) -> None:
        api = self.api
        with _Status(api) as status:
            if self.session:
                api.TF_CloseSession(self.session, status)
                api.TF_DeleteSession(self.session, status)
                self.session = None
        if self.graph:
            api.TF_DeleteGraph(self.graph)
            self.graph = None

    def __enter__(self) -> "SavedModelSession":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:
        if getattr(self, "graph", None) is not None:
            self.close()
