"""tensorflow_model_server's flags, and a command line's flags as a dict: what the launcher, the
image and the manifests are checked against."""

from __future__ import annotations

# Every flag tensorflow_model_server defines (tensorflow_serving/model_servers/main.cc, 2.21).
TF_SERVING_FLAGS = {
    "port", "grpc_socket_path", "rest_api_port", "rest_api_num_threads", "rest_api_timeout_in_ms",
    "rest_api_enable_cors_support", "enable_batching", "allow_version_labels_for_unavailable_models",
    "batching_parameters_file", "enable_per_model_batching_parameters", "model_config_file",
    "model_config_file_poll_wait_seconds", "model_name", "model_base_path", "num_load_threads",
    "num_unload_threads", "max_num_load_retries", "load_retry_interval_micros", "file_system_poll_wait_seconds",
    "flush_filesystem_caches", "tensorflow_session_parallelism", "tensorflow_session_config_file",
    "tensorflow_intra_op_parallelism", "tensorflow_inter_op_parallelism", "use_alts_credentials",
    "ssl_config_file", "platform_config_file", "per_process_gpu_memory_fraction", "saved_model_tags",
    "grpc_channel_arguments", "grpc_max_threads", "enable_model_warmup", "num_request_iterations_for_warmup",
    "version", "monitoring_config_file", "remove_unused_fields_from_bundle_metagraph", "prefer_tflite_model",
    "num_tflite_pools", "num_tflite_interpreters_per_pool", "enable_signature_method_name_check",
    "xla_cpu_compilation_enabled", "xla_gpu_compilation_enabled", "enable_profiler",
    "thread_pool_factory_config_file", "mixed_precision", "skip_initialize_tpu", "enable_grpc_healthcheck_service",
    "enable_serialization_as_tensor_content",
}
# Flags only the embedded server has (TF Serving listens on all interfaces and has no equivalent).
EMBEDDED_ONLY_FLAGS = {"host", "max_message_bytes", "models_root", "shutdown_grace_seconds",
                       "max_concurrent_requests", "rerun_failed_batches", "start_with_failed_models"}


def flags_of(argv: list[str]) -> dict[str, str]:
    """{name: value} of TF Serving's --name=value arguments; each flag once."""
    flags = {}
    for arg in argv:
        assert arg.startswith("--") and "=" in arg, f"TF Serving flags are --name=value: {arg!r}"
        name, value = arg[2:].split("=", 1)
        assert name not in flags, f"--{name} given twice"
        flags[name] = value
    return flags
