"""Wire-compatible TensorFlow Serving messages without TensorFlow.

`tensorflow-serving-api` imports all of TensorFlow (seconds and ~600 MB) just for a handful of
protobuf messages. We declare the few we need here, with the same package, message names and field
numbers as tensorflow/core/framework/{tensor,tensor_shape,types}.proto,
tensorflow/core/protobuf/meta_graph.proto and tensorflow_serving/apis/{model,predict,
get_model_metadata}.proto, so the bytes on the wire are identical. Fields we never use are left out;
protobuf keeps them as unknown fields. The descriptors live in a private pool, so a process that
also imports the official modules gets no duplicate-symbol error.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
from google.protobuf import any_pb2, descriptor_pb2, descriptor_pool, message_factory, wrappers_pb2

_F = descriptor_pb2.FieldDescriptorProto
_REPEATED, _OPTIONAL = _F.LABEL_REPEATED, _F.LABEL_OPTIONAL
_SCALARS = {"int32": _F.TYPE_INT32, "int64": _F.TYPE_INT64, "uint32": _F.TYPE_UINT32,
            "uint64": _F.TYPE_UINT64, "float": _F.TYPE_FLOAT, "double": _F.TYPE_DOUBLE,
            "bool": _F.TYPE_BOOL, "string": _F.TYPE_STRING, "bytes": _F.TYPE_BYTES}

# tensorflow.DataType values (types.proto); only those a classifier's signatures can carry. The C API
# loader (serving/servables/session.py) keeps the same table; tests/test_shared_facts.py holds both to TF's.
DT_FLOAT, DT_DOUBLE, DT_INT32, DT_UINT8, DT_INT16, DT_INT8, DT_STRING = 1, 2, 3, 4, 5, 6, 7
DT_INT64, DT_BOOL, DT_UINT16, DT_HALF, DT_UINT32, DT_UINT64 = 9, 10, 17, 19, 22, 23


def _message(parent, scope: str, name: str, fields: list[tuple], map_entry: bool = False):
    """Add message `scope.name`; fields are (name, number, type, repeated?) with type a scalar name,
    '.pkg.Message' / '.pkg.DataType', or a map ('map', key, value) as protoc lowers it."""
    msg = parent.add(name=name)
    msg.options.map_entry = map_entry
    for fname, number, ftype, repeated in fields:
        field = msg.field.add(name=fname, number=number, label=_REPEATED if repeated else _OPTIONAL)
        if isinstance(ftype, tuple):  # map<key, value> is a repeated nested XxxEntry message
            entry = "".join(p.capitalize() for p in fname.split("_")) + "Entry"
            _message(msg.nested_type, f"{scope}.{name}", entry,
                     [("key", 1, ftype[1], False), ("value", 2, ftype[2], False)], True)
            field.type, field.type_name = _F.TYPE_MESSAGE, f"{scope}.{name}.{entry}"
        elif ftype in _SCALARS:
            field.type = _SCALARS[ftype]
        else:
            field.type = _F.TYPE_ENUM if ftype.endswith("DataType") else _F.TYPE_MESSAGE
            field.type_name = ftype
    return msg


TF, TS = ".tensorflow", ".tensorflow.serving"


def _build_pool() -> descriptor_pool.DescriptorPool:
    pool = descriptor_pool.DescriptorPool()
    for wkt in (wrappers_pb2, any_pb2):
        pool.AddSerializedFile(wkt.DESCRIPTOR.serialized_pb)

    tf = descriptor_pb2.FileDescriptorProto(name="camserve/tensorflow_wire.proto", package="tensorflow",
                                            syntax="proto3")
    enum = tf.enum_type.add(name="DataType")
    enum.value.add(name="DT_INVALID", number=0)  # proto3: the zero value comes first
    for name, value in sorted((k, v) for k, v in globals().items() if k.startswith("DT_")):
        enum.value.add(name=name, number=value)
    shape = _message(tf.message_type, TF, "TensorShapeProto",
                     [("dim", 2, ".tensorflow.TensorShapeProto.Dim", True), ("unknown_rank", 3, "bool", False)])
    _message(shape.nested_type, TF + ".TensorShapeProto", "Dim",
             [("size", 1, "int64", False), ("name", 2, "string", False)])
    _message(tf.message_type, TF, "TensorProto", [
        ("dtype", 1, ".tensorflow.DataType", False), ("tensor_shape", 2, ".tensorflow.TensorShapeProto", False),
        ("version_number", 3, "int32", False), ("tensor_content", 4, "bytes", False),
        ("half_val", 13, "int32", True), ("float_val", 5, "float", True), ("double_val", 6, "double", True),
        ("int_val", 7, "int32", True), ("string_val", 8, "bytes", True), ("int64_val", 10, "int64", True),
        ("bool_val", 11, "bool", True), ("uint32_val", 16, "uint32", True), ("uint64_val", 17, "uint64", True)])
    _message(tf.message_type, TF, "TensorInfo", [  # meta_graph.proto; sparse/composite encodings omitted
        ("name", 1, "string", False), ("dtype", 2, ".tensorflow.DataType", False),
        ("tensor_shape", 3, ".tensorflow.TensorShapeProto", False)])
    _message(tf.message_type, TF, "SignatureDef", [
        ("inputs", 1, ("map", "string", ".tensorflow.TensorInfo"), True),
        ("outputs", 2, ("map", "string", ".tensorflow.TensorInfo"), True), ("method_name", 3, "string", False)])
    pool.Add(tf)

    ts = descriptor_pb2.FileDescriptorProto(name="camserve/serving_wire.proto", package="tensorflow.serving",
                                            syntax="proto3", dependency=[
                                                tf.name, "google/protobuf/wrappers.proto", "google/protobuf/any.proto"])
    _message(ts.message_type, TS, "ModelSpec", [
        ("name", 1, "string", False), ("version", 2, ".google.protobuf.Int64Value", False),
        ("signature_name", 3, "string", False), ("version_label", 4, "string", False)])
    _message(ts.message_type, TS, "PredictRequest", [
        ("model_spec", 1, ".tensorflow.serving.ModelSpec", False),
        ("inputs", 2, ("map", "string", ".tensorflow.TensorProto"), True), ("output_filter", 3, "string", True)])
    _message(ts.message_type, TS, "PredictResponse", [
        ("outputs", 1, ("map", "string", ".tensorflow.TensorProto"), True),
        ("model_spec", 2, ".tensorflow.serving.ModelSpec", False)])
    _message(ts.message_type, TS, "GetModelMetadataRequest", [
        ("model_spec", 1, ".tensorflow.serving.ModelSpec", False), ("metadata_field", 2, "string", True)])
    _message(ts.message_type, TS, "GetModelMetadataResponse", [
        ("model_spec", 1, ".tensorflow.serving.ModelSpec", False),
        ("metadata", 2, ("map", "string", ".google.protobuf.Any"), True)])
    _message(ts.message_type, TS, "SignatureDefMap", [
        ("signature_def", 1, ("map", "string", ".tensorflow.SignatureDef"), True)])
    pool.Add(ts)
    return pool


POOL = _build_pool()
_cls = lambda name: message_factory.GetMessageClass(POOL.FindMessageTypeByName(name))  # noqa: E731
TensorProto = _cls("tensorflow.TensorProto")
TensorShapeProto = _cls("tensorflow.TensorShapeProto")
SignatureDef = _cls("tensorflow.SignatureDef")
ModelSpec = _cls("tensorflow.serving.ModelSpec")
PredictRequest = _cls("tensorflow.serving.PredictRequest")
PredictResponse = _cls("tensorflow.serving.PredictResponse")
GetModelMetadataRequest = _cls("tensorflow.serving.GetModelMetadataRequest")
GetModelMetadataResponse = _cls("tensorflow.serving.GetModelMetadataResponse")
SignatureDefMap = _cls("tensorflow.serving.SignatureDefMap")

PREDICT_METHOD = "/tensorflow.serving.PredictionService/Predict"
METADATA_METHOD = "/tensorflow.serving.PredictionService/GetModelMetadata"

NUMPY_DTYPES = {DT_FLOAT: np.float32, DT_DOUBLE: np.float64, DT_INT32: np.int32, DT_UINT8: np.uint8,
                DT_INT16: np.int16, DT_INT8: np.int8, DT_INT64: np.int64, DT_BOOL: np.bool_,
                DT_UINT16: np.uint16, DT_HALF: np.float16, DT_UINT32: np.uint32, DT_UINT64: np.uint64}
TF_DTYPES = {np.dtype(v): k for k, v in NUMPY_DTYPES.items()}
# Which repeated field TensorFlow's AsProtoField() fills for each dtype (small ints share int_val).
_VALUE_FIELD = {DT_FLOAT: "float_val", DT_DOUBLE: "double_val", DT_INT32: "int_val", DT_UINT8: "int_val",
                DT_INT16: "int_val", DT_INT8: "int_val", DT_UINT16: "int_val", DT_INT64: "int64_val",
                DT_BOOL: "bool_val", DT_HALF: "half_val", DT_UINT32: "uint32_val", DT_UINT64: "uint64_val"}


def make_tensor(values) -> TensorProto:
    """numpy array (or nested list) -> TensorProto: numbers as little-endian `tensor_content`
    (what tf.make_tensor_proto sends, one memcpy), strings as `string_val`."""
    array = np.asarray(values)
    proto = TensorProto()
    proto.tensor_shape.dim.extend(TensorShapeProto.Dim(size=int(d)) for d in array.shape)
    if array.dtype.kind in "USO":
        proto.dtype = DT_STRING
        proto.string_val.extend(v.encode() if isinstance(v, str) else bytes(v) for v in array.reshape(-1))
        return proto
    if array.dtype.newbyteorder("=") not in TF_DTYPES:
        raise TypeError(f"no TensorFlow dtype for numpy {array.dtype}")
    proto.dtype = TF_DTYPES[array.dtype.newbyteorder("=")]
    proto.tensor_content = np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<")).tobytes()
    return proto


def to_numpy(proto) -> np.ndarray:
    """TensorProto -> numpy array, from `tensor_content` or the typed `*_val` field (TF Serving
    uses either), with TensorFlow's rule that a short value list repeats its last element."""
    shape = [d.size for d in proto.tensor_shape.dim]
    size = int(np.prod(shape, dtype=np.int64))
    if proto.dtype == DT_STRING:
        out = np.empty(len(proto.string_val), dtype=object)
        out[:] = list(proto.string_val)
        return out.reshape(shape)
    if proto.dtype not in NUMPY_DTYPES:
        raise TypeError(f"unsupported TensorProto dtype {proto.dtype}")
    dtype = np.dtype(NUMPY_DTYPES[proto.dtype])
    if proto.tensor_content:
        return np.frombuffer(proto.tensor_content, dtype=dtype.newbyteorder("<")).astype(dtype).reshape(shape)
    values = getattr(proto, _VALUE_FIELD[proto.dtype])
    if proto.dtype == DT_HALF:  # half_val holds the float16 bit patterns
        flat = np.asarray(values, dtype=np.uint16).view(np.float16)
    else:
        flat = np.asarray(values, dtype=dtype)
    if 0 < flat.size < size:
        flat = np.concatenate([flat, np.repeat(flat[-1:], size - flat.size)])
    return flat.reshape(shape)


def predict_request(spec, images: np.ndarray | None = None, image_bytes: Sequence[bytes] | None = None,
                    class_index: np.ndarray | None = None, method: Sequence[str] | None = None,
                    output_filter: Sequence[str] = ()):
    """The PredictRequest of every caller here (client, benchmark, the exporter's warm-up records).

    `spec` is a ModelSpec; `images` [N,H,W,3] uint8 go to a signature, `image_bytes` (N encoded
    images) to its `_bytes` twin; `class_index` [N] int32 (-1: the predicted class) to explain ones;
    `method` [N] (each row's method) to `explain` and `explain_bytes`.
    """
    request = PredictRequest(output_filter=list(output_filter))
    request.model_spec.CopyFrom(spec)
    if images is not None:
        request.inputs["images"].CopyFrom(make_tensor(images))
    if image_bytes is not None:
        request.inputs["image_bytes"].CopyFrom(make_tensor(np.array(list(image_bytes), dtype=object)))
    if class_index is not None:
        request.inputs["class_index"].CopyFrom(make_tensor(np.asarray(class_index, np.int32)))
    if method is not None:
        request.inputs["method"].CopyFrom(make_tensor(np.array(list(method), dtype=object)))
    return request
