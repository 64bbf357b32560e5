"""The TensorFlow session settings our servers run models with: serving/session.config on a GPU
server, serving/session_cpu.config on one without.

A text `tensorflow.ConfigProto`, which TF Serving reads with `--tensorflow_session_config_file`
(model_servers/server.cc parses it into the SessionBundleConfig's session_config, then applies its
flags for GPU memory and thread counts over it). The embedded server takes the same flag, and the
exporter checks every version under the settings of its machine, so that the check runs what a server
there runs.
"""

from __future__ import annotations

import os
import pathlib

from google.protobuf import text_format
from tensorflow.core.protobuf import config_pb2

SESSION_CONFIG = pathlib.Path(__file__).resolve().parent.parent / "session.config"
CPU_SESSION_CONFIG = SESSION_CONFIG.with_name("session_cpu.config")


def read(path: str | os.PathLike = SESSION_CONFIG) -> config_pb2.ConfigProto:
    """Parse a session config file as TF Serving does; errors name the file, line and column."""
    try:
        return text_format.Parse(pathlib.Path(path).read_text(), config_pb2.ConfigProto())
    except text_format.ParseError as error:
        raise ValueError(f"{path}: not a valid tensorflow.ConfigProto: {error}") from None


def session_config(path: str | os.PathLike | None = None) -> bytes:
    """The serialized ConfigProto of a session config file (SavedModelSession's `config`); by default the
    one of this machine: SESSION_CONFIG where TensorFlow sees a GPU, else CPU_SESSION_CONFIG."""
    if path is None:
        import tensorflow as tf

        path = SESSION_CONFIG if tf.config.list_physical_devices("GPU") else CPU_SESSION_CONFIG
    return read(path).SerializeToString()
