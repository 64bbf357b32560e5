"""Command line of the embedded server, with tensorflow_model_server's flag names.

    python -m serving --port 8500 --model_name NAME --model_base_path models/NAME
    python -m serving --port 8500 --model_config_file serving/models.config \\
        [--enable_batching --batching_parameters_file serving/batching.config]

Flags take `--flag=value` or `--flag value`; booleans also `--flag` alone. TF Serving itself reads
only `--flag=value`: it prints "unknown argument" for `--flag value` and goes on with the default,
so every TF Serving command line we write uses `=`. Only a subset of TF Serving's flags exists
here; an unknown flag is an error, not silently ignored.

Memory: start it with `MALLOC_ARENA_MAX=2` in the environment (the Makefile's serve, demo and bench
targets do). glibc otherwise keeps up to 8 malloc arenas per core and the per-request tensors of
the gRPC and TensorFlow threads spread over them: under 32 callers on ResNet50 with batching, RSS
plateaus at ~1.36 GB instead of ~1.46 GB (docs/BENCHMARKS.md has the figures).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

# Before TensorFlow is imported: 2 keeps TensorFlow's C++ INFO and WARNING lines out of the log, among
# them the multi-line "Local rendezvous is aborting" that every refused request would print (the
# refusal itself is answered to the caller, and counted in the metrics).
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from . import configs
from .servables.session_config import session_config
from .server import MAX_MESSAGE_BYTES, ServerOptions, serve


def _bool(text: str) -> bool:
    value = text.strip().lower()
    if value in ("1", "true", "yes"):
        return True
    if value in ("0", "false", "no"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m serving",
        description="Embedded TensorFlow Serving-compatible server: gRPC (Predict, GetModelMetadata, GetModelStatus, "
                    "HandleReloadConfigRequest) and REST (status, metadata, predict, Prometheus metrics).",
        allow_abbrev=False,
    )
    flag = p.add_argument
    flag("--port", type=int, default=8500, help="gRPC port (0: any free port)")
    flag("--host", default="127.0.0.1", help="address to listen on (0.0.0.0 for all interfaces)")
    flag("--rest_api_port", type=int, default=0, help="HTTP/REST API port (0: none, as in TF Serving)")
    flag("--rest_api_num_threads", type=int, default=None, help="REST requests computed at once (default: 4 per CPU)")
    flag("--rest_api_timeout_in_ms", type=int, default=30000, help="timeout for HTTP/REST API calls")
    flag("--rest_api_enable_cors_support", type=_bool, nargs="?", const=True, default=False,
         help="add CORS headers to REST responses")
    flag("--monitoring_config_file", default="",
         help="text MonitoringConfig: prometheus_config { enable: true path: ... } serves metrics on the REST port")
    flag("--model_name", default="default", help="name of the single model (with --model_base_path)")
    flag("--model_base_path", default="", help="directory holding the numeric version directories")
    flag("--model_config_file", default="", help="text ModelServerConfig (instead of --model_name/--model_base_path)")
    flag("--model_config_file_poll_wait_seconds", type=float, default=0,
         help="seconds between re-reads of --model_config_file: added models load, removed ones unload (0: never)")
    flag("--enable_batching", type=_bool, nargs="?", const=True, default=False, help="batch concurrent requests")
    flag("--batching_parameters_file", default="", help="text BatchingParameters (default: TF Serving's defaults)")
    flag("--tensorflow_session_config_file", default="",
         help="text tensorflow.ConfigProto of the sessions that run the models (serving/session.config: the "
              "graph optimizer's settings; default: TensorFlow's)")
    flag("--enable_model_warmup", type=_bool, nargs="?", const=True, default=True,
         help="replay assets.extra/tf_serving_warmup_requests before serving a version")
    flag("--file_system_poll_wait_seconds", type=float, default=1,
         help="seconds between looks for new versions (<= 0: look once, at start)")
    flag("--grpc_max_threads", type=int, default=None,
         help="gRPC worker threads (default: 4 per CPU, plus room to fill the batches when batching)")
    flag("--max_message_bytes", type=int, default=MAX_MESSAGE_BYTES, help="largest gRPC message sent or received")
    flag("--ssl_config_file", default="", help="text SSLConfig (server_key, server_cert PEM; custom_ca, client_verify)")
    flag("--enable_serialization_as_tensor_content", type=_bool, nargs="?", const=True, default=False,
         help="answer with tensor_content bytes instead of the typed value fields")
    flag("--models_root", default="models",
         help="where base paths under /models (the container path in serving/models.config) are read from "
              "when this machine has no /models directory")
    flag("--shutdown_grace_seconds", type=float, default=30,
         help="on SIGTERM/SIGINT, how long in-flight requests may take to finish")
    flag("--max_concurrent_requests", type=int, default=0,
         help="calls handled or queued at once; more are refused with RESOURCE_EXHAUSTED (0: no limit; "
              "not a TF Serving flag)")
    flag("--rerun_failed_batches", type=_bool, nargs="?", const=True, default=False,
         help="with batching, rerun a failed batch one request at a time so that only the faulty request fails "
              "(not a TF Serving flag: TF Serving fails every request of the batch)")
    flag("--start_with_failed_models", type=_bool, nargs="?", const=True, default=False,
         help="start even when a model fails to load, serving the others (not a TF Serving flag: TF Serving exits)")
    return p


def options_from_args(args: argparse.Namespace,
                      p: argparse.ArgumentParser) -> tuple[configs.ModelServerConfig, ServerOptions]:
    """The ModelServerConfig and ServerOptions the flags describe (usage errors exit 2)."""
    if bool(args.model_config_file) == bool(args.model_base_path):
        p.error("give either --model_config_file or --model_base_path (with --model_name)")
    try:
        if args.model_config_file:
            config = configs.localise(configs.read_model_server_config(args.model_config_file), args.models_root)
        else:
            config = configs.single_model_config(args.model_name, args.model_base_path)
        batching = None
        if args.enable_batching:
            batching = (
                configs.read_batching_parameters(args.batching_parameters_file)
                if args.batching_parameters_file
                else configs.BatchingOptions()
            )
        elif args.batching_parameters_file:
            p.error("--batching_parameters_file needs --enable_batching")
        ssl = configs.read_text_proto(args.ssl_config_file, configs.SSLConfig) if args.ssl_config_file else None
        monitoring = (configs.read_text_proto(args.monitoring_config_file, configs.MonitoringConfig)
                      if args.monitoring_config_file else None)
        session = session_config(args.tensorflow_session_config_file) if args.tensorflow_session_config_file else b""
    except (OSError, ValueError) as e:
        p.error(str(e))
    options = ServerOptions(
        host=args.host,
        port=args.port,
        rest_api_port=args.rest_api_port,
        rest_api_num_threads=args.rest_api_num_threads,
        rest_api_timeout_in_ms=args.rest_api_timeout_in_ms,
        rest_api_enable_cors_support=args.rest_api_enable_cors_support,
        monitoring=monitoring,
        grpc_max_threads=args.grpc_max_threads,
        max_message_bytes=args.max_message_bytes,
        enable_model_warmup=args.enable_model_warmup,
        session_config=session,
        file_system_poll_wait_seconds=args.file_system_poll_wait_seconds,
        model_config_file=args.model_config_file,
        model_config_file_poll_wait_seconds=args.model_config_file_poll_wait_seconds,
        models_root=args.models_root,
        batching=batching,
        tensor_content=args.enable_serialization_as_tensor_content,
        ssl=ssl,
        shutdown_grace_seconds=args.shutdown_grace_seconds,
        max_concurrent_requests=args.max_concurrent_requests,
        rerun_failed_batches=args.rerun_failed_batches,
        start_with_failed_models=args.start_with_failed_models,
    )
    return config, options


def main(argv: list[str] | None = None) -> int:
    p = parser()
    args = p.parse_args(argv)
    config, options = options_from_args(args, p)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    return serve(config, options)


if __name__ == "__main__":
    sys.exit(main())
