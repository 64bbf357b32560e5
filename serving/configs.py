"""Read TensorFlow Serving's text-format config files, exactly as tensorflow_model_server does.

`ModelServerConfig` comes from tensorflow-serving-api. The pip package does not ship the messages
for `--batching_parameters_file` (`BatchingParameters`), `--monitoring_config_file`
(`MonitoringConfig`) or `--ssl_config_file` (`SSLConfig`), so their schemas are declared here with
the same package, field names, numbers and types as TF Serving's own .proto files
(tensorflow_serving/servables/tensorflow/session_bundle_config.proto,
tensorflow_serving/config/monitoring_config.proto and ssl_config.proto): a file that parses here
parses in TF Serving, and a typo fails here as it would there.
"""

from __future__ import annotations

import dataclasses
import os
import pathlib

from google.protobuf import descriptor_pb2, descriptor_pool, message, message_factory, text_format, wrappers_pb2
from tensorflow_serving.config import model_server_config_pb2

_F = descriptor_pb2.FieldDescriptorProto

# (message, [(field, number, type, label, type_name)]) in TF Serving's .proto files.
_SCHEMAS = {
    "BatchingParameters": [
        ("max_batch_size", 1, _F.TYPE_MESSAGE, _F.LABEL_OPTIONAL, ".google.protobuf.Int64Value"),
        ("batch_timeout_micros", 2, _F.TYPE_MESSAGE, _F.LABEL_OPTIONAL, ".google.protobuf.Int64Value"),
        ("max_enqueued_batches", 3, _F.TYPE_MESSAGE, _F.LABEL_OPTIONAL, ".google.protobuf.Int64Value"),
        ("num_batch_threads", 4, _F.TYPE_MESSAGE, _F.LABEL_OPTIONAL, ".google.protobuf.Int64Value"),
        ("thread_pool_name", 5, _F.TYPE_MESSAGE, _F.LABEL_OPTIONAL, ".google.protobuf.StringValue"),
        ("allowed_batch_sizes", 6, _F.TYPE_INT64, _F.LABEL_REPEATED, None),
        ("pad_variable_length_inputs", 7, _F.TYPE_BOOL, _F.LABEL_OPTIONAL, None),
        ("enable_large_batch_splitting", 8, _F.TYPE_MESSAGE, _F.LABEL_OPTIONAL, ".google.protobuf.BoolValue"),
        ("max_execution_batch_size", 9, _F.TYPE_MESSAGE, _F.LABEL_OPTIONAL, ".google.protobuf.Int64Value"),
    ],
    "PrometheusConfig": [
        ("enable", 1, _F.TYPE_BOOL, _F.LABEL_OPTIONAL, None),
        ("path", 2, _F.TYPE_STRING, _F.LABEL_OPTIONAL, None),
    ],
    "MonitoringConfig": [
        ("prometheus_config", 1, _F.TYPE_MESSAGE, _F.LABEL_OPTIONAL, ".tensorflow.serving.PrometheusConfig"),
    ],
    "SSLConfig": [
        ("server_key", 1, _F.TYPE_STRING, _F.LABEL_OPTIONAL, None),
        ("server_cert", 2, _F.TYPE_STRING, _F.LABEL_OPTIONAL, None),
        ("custom_ca", 3, _F.TYPE_STRING, _F.LABEL_OPTIONAL, None),
        ("client_verify", 4, _F.TYPE_BOOL, _F.LABEL_OPTIONAL, None),
    ],
}


def _message_classes() -> dict[str, type[message.Message]]:
    # A private pool: the names cannot clash with a future tensorflow-serving-api that ships them.
    pool = descriptor_pool.DescriptorPool()
    wrappers = descriptor_pb2.FileDescriptorProto()
    wrappers_pb2.DESCRIPTOR.CopyToProto(wrappers)
    pool.Add(wrappers)
    file = descriptor_pb2.FileDescriptorProto(
        name="camserve/tensorflow_serving_configs.proto",
        package="tensorflow.serving",
        syntax="proto3",
        dependency=["google/protobuf/wrappers.proto"],
    )
    for name, fields in _SCHEMAS.items():
        msg = file.message_type.add(name=name)
        for field, number, type_, label, type_name in fields:
            f = msg.field.add(name=field, number=number, type=type_, label=label, json_name=field)
            if type_name:
                f.type_name = type_name
    pool.Add(file)
    return {
        name: message_factory.GetMessageClass(pool.FindMessageTypeByName(f"tensorflow.serving.{name}"))
        for name in _SCHEMAS
    }


_CLASSES = _message_classes()
BatchingParameters = _CLASSES["BatchingParameters"]
MonitoringConfig = _CLASSES["MonitoringConfig"]
SSLConfig = _CLASSES["SSLConfig"]
ModelServerConfig = model_server_config_pb2.ModelServerConfig


def read_text_proto(path: str | os.PathLike, message_class: type[message.Message]) -> message.Message:
    """Parse a text-format protobuf file; errors name the file, line and column."""
    text = pathlib.Path(path).read_text()
    try:
        return text_format.Parse(text, message_class())
    except text_format.ParseError as e:
        raise ValueError(f"{path}: not a valid {message_class.DESCRIPTOR.name}: {e}") from None


def read_model_server_config(path: str | os.PathLike) -> model_server_config_pb2.ModelServerConfig:
    """A `--model_config_file`: a model_config_list of uniquely named TensorFlow models."""
    config = read_text_proto(path, ModelServerConfig)
    if config.WhichOneof("config") != "model_config_list":
        raise ValueError(f"{path}: needs a model_config_list (custom_model_config is not supported)")
    names = [m.name for m in config.model_config_list.config]
    if not names:
        raise ValueError(f"{path}: model_config_list has no model")
    for model in config.model_config_list.config:
        if not model.name or not model.base_path:
            raise ValueError(f"{path}: every model needs a name and a base_path")
        if model.model_platform not in ("", "tensorflow"):
            raise ValueError(f"{path}: model {model.name!r}: platform {model.model_platform!r} is not supported")
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ValueError(f"{path}: model names listed twice: {', '.join(duplicates)}")
    return config


CONTAINER_MODELS = "/models"  # where serving/models.config expects the models (the Docker mount)


def map_container_models(
    config: model_server_config_pb2.ModelServerConfig, local_root: str | os.PathLike
) -> model_server_config_pb2.ModelServerConfig:
    """A copy of the config with base paths under /models moved under the absolute `local_root`."""
    local = ModelServerConfig()
    local.CopyFrom(config)
    root = str(pathlib.Path(local_root).resolve())
    for model in local.model_config_list.config:
        path = model.base_path
        if path == CONTAINER_MODELS or path.startswith(CONTAINER_MODELS + "/"):
            model.base_path = root + path[len(CONTAINER_MODELS) :]
    return local


def localise(
    config: model_server_config_pb2.ModelServerConfig, models_root: str | os.PathLike
) -> model_server_config_pb2.ModelServerConfig:
    """The config as this machine reads it: base paths under /models come from `models_root` when
    there is no /models directory (outside the container)."""
    return config if os.path.isdir(CONTAINER_MODELS) else map_container_models(config, models_root)


def single_model_config(model_name: str, model_base_path: str) -> model_server_config_pb2.ModelServerConfig:
    """The config `--model_name` + `--model_base_path` stand for (as in TF Serving)."""
    config = ModelServerConfig()
    config.model_config_list.config.add(name=model_name, base_path=model_base_path, model_platform="tensorflow")
    return config


@dataclasses.dataclass(frozen=True)
class BatchingOptions:
    """Batching parameters with TF Serving's defaults for the fields a file leaves out."""

    max_batch_size: int = 1000
    batch_timeout_micros: int = 0
    max_enqueued_batches: int = 10
    num_batch_threads: int = os.cpu_count() or 1
    allowed_batch_sizes: tuple[int, ...] = ()
    enable_large_batch_splitting: bool = False
    max_execution_batch_size: int | None = None

    def __post_init__(self) -> None:
        for name in ("max_batch_size", "max_enqueued_batches", "num_batch_threads"):
            if getattr(self, name) < 1:
                raise ValueError(f"batching: {name} must be >= 1, got {getattr(self, name)}")
        if self.batch_timeout_micros < 0:
            raise ValueError("batching: batch_timeout_micros must be >= 0")
        sizes = self.allowed_batch_sizes
        if sizes:
            if any(b <= a for a, b in zip(sizes, sizes[1:])) or sizes[0] < 1:
                raise ValueError(f"batching: allowed_batch_sizes must be positive and increasing, got {list(sizes)}")
            if sizes[-1] != self.max_batch_size:
                raise ValueError(
                    "batching: last entry in allowed_batch_sizes must match max_batch_size; "
                    f"last entry was {sizes[-1]}; expected {self.max_batch_size}"
                )

    @property
    def execution_batch_size(self) -> int:
        """The largest batch one model call gets."""
        if self.enable_large_batch_splitting and self.max_execution_batch_size:
            return min(self.max_execution_batch_size, self.max_batch_size)
        return self.max_batch_size

    @classmethod
    def from_proto(cls, params: message.Message) -> "BatchingOptions":
        kwargs = {}
        for name in (
            "max_batch_size",
            "batch_timeout_micros",
            "max_enqueued_batches",
            "num_batch_threads",
            "enable_large_batch_splitting",
            "max_execution_batch_size",
        ):
            if params.HasField(name):
                kwargs[name] = getattr(params, name).value
        kwargs["allowed_batch_sizes"] = tuple(params.allowed_batch_sizes)
        return cls(**kwargs)


def read_batching_parameters(path: str | os.PathLike) -> BatchingOptions:
    """A `--batching_parameters_file`, checked like TF Serving checks it."""
    params = read_text_proto(path, BatchingParameters)
    try:
        return BatchingOptions.from_proto(params)
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None
