"""The command that runs the real TensorFlow Serving with this directory's config files.

    python -m serving.tfserving [--dry-run] [--runtime auto|binary|docker] [--base-path models]

`auto` runs `tensorflow_model_server` when it is on PATH, else the `tensorflow/serving` GPU image
with Docker. The configs are checked first (parsed with TF Serving's own message schemas), so a
typo fails here instead of in a container log. `models.config` names container paths under
`/models`: Docker mounts `--base-path` there; for the local binary the config is rewritten with
`/models` replaced by the absolute `--base-path` into `<base-path>/tfserving.models.config`.
`--dry-run` prints the command (one shell-quoted line on stdout) instead of running it.

A model exported with `--jit-compile` needs XLA, which TF Serving turns off unless told: when a
version under `--base-path` holds XLA-compiled functions, the XLA flag is added (`--xla` forces it).
"""

from __future__ import annotations

import argparse
import os
import pathlib
import shlex
import shutil
import sys

from google.protobuf import text_format

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # before TensorFlow is imported

from . import configs

HERE = pathlib.Path(__file__).resolve().parent
BINARY = "tensorflow_model_server"
IMAGE = "tensorflow/serving:2.21.0-gpu"
CONTAINER_MODELS = configs.CONTAINER_MODELS
CONTAINER_CONFIG = "/config"
LOCAL_CONFIG_NAME = "tfserving.models.config"
# --per_process_gpu_memory_fraction of the image (serving/Dockerfile) and of the Docker runtime here:
# TF Serving takes this share of the GPU's memory at start, one replica per GPU. TensorFlow's own
# choice (0) takes nearly all of it; 0.9 leaves a tenth outside TensorFlow's allocator for the CUDA
# context, cuDNN/cuBLAS workspaces and XLA's autotuning. Not measured on a GPU yet. Two replicas
# on one GPU: 0.45 each (a later flag wins: `docker run IMAGE --per_process_gpu_memory_fraction=0.45`).
GPU_MEMORY_FRACTION = 0.9


def check_configs(model_config: pathlib.Path, batching_config: pathlib.Path | None,
                  monitoring_config: pathlib.Path | None, rest_port: int,
                  session_config: pathlib.Path | None = None) -> configs.ModelServerConfig:
    """Parse every config file as TF Serving will; raises ValueError on the first problem."""
    from .servables.session_config import read

    if session_config is not None:
        read(session_config)
    config = configs.read_model_server_config(model_config)
    if batching_config is not None:
        configs.read_batching_parameters(batching_config)
    if monitoring_config is not None:
        monitoring = configs.read_text_proto(monitoring_config, configs.MonitoringConfig)
        if monitoring.prometheus_config.enable and not rest_port:
            raise ValueError(f"{monitoring_config}: Prometheus metrics are served on the REST port: set a rest port")
    return config


def models_needing_xla(config: configs.ModelServerConfig, base_path: str | os.PathLike) -> list[str]:
    """Names of the config's models with a version on disk (under `base_path` for /models) that
    holds XLA-compiled functions."""
    from .servables.versions import numeric_versions
    from .servables.xla import needs_xla

    local = configs.map_container_models(config, base_path)
    return [model.name for model in local.model_config_list.config
            if any(needs_xla(os.path.join(model.base_path, d)) for d in numeric_versions(model.base_path).values())]


def server_flags(model_config: str, batching_config: str | None, monitoring_config: str | None, port: int,
                 rest_port: int, poll_seconds: int, gpu_memory_fraction: float | None, xla: str | None,
                 session_config: str | None = None) -> list[str]:
    """tensorflow_model_server flags (names as in tensorflow_serving/model_servers/main.cc).

    `xla`: "cpu" or "gpu" adds --xla_<xla>_compilation_enabled=true. TF Serving keeps XLA on when
    either is set (main.cc disables it only when both are false); the GPU one exists from 2.18.
    """
    flags = [f"--port={port}"]
    if rest_port:
        flags.append(f"--rest_api_port={rest_port}")
    flags.append(f"--model_config_file={model_config}")
    if batching_config:
        flags += ["--enable_batching=true", f"--batching_parameters_file={batching_config}"]
    if monitoring_config:
        flags.append(f"--monitoring_config_file={monitoring_config}")
    if session_config:  # the graph optimizer's settings: time to ready (serving/session.config)
        flags.append(f"--tensorflow_session_config_file={session_config}")
    flags += ["--enable_model_warmup=true", f"--file_system_poll_wait_seconds={poll_seconds}"]
    if gpu_memory_fraction is not None:
        flags.append(f"--per_process_gpu_memory_fraction={gpu_memory_fraction}")
    if xla:  # needed for models exported with --jit-compile
        flags.append(f"--xla_{xla}_compilation_enabled=true")
    return flags


def build_command(args: argparse.Namespace, runtime: str) -> list[str]:
    """argv for `runtime` ("binary" or "docker"); writes the localised config for the binary."""
    config_dir = pathlib.Path(args.config_dir).resolve()
    model_config = config_dir / "models.config"
    batching = config_dir / "batching.config" if args.batching else None
    monitoring = config_dir / "monitoring.config"
    # The GPU image runs the GPU's session settings; the binary, like --xla below, a CPU's.
    session = config_dir / ("session.config" if runtime == "docker" else "session_cpu.config")
    base_path = pathlib.Path(args.base_path)
    config = check_configs(model_config, batching, monitoring, args.rest_port, session)
    needing = models_needing_xla(config, base_path)
    if needing:
        print(f"serving.tfserving: {', '.join(needing)} compiled with XLA (--jit-compile): XLA flag added",
              file=sys.stderr)
    xla = ("gpu" if runtime == "docker" else "cpu") if args.xla or needing else None
    fraction = args.gpu_memory_fraction
    if fraction is None and runtime == "docker":
        fraction = GPU_MEMORY_FRACTION
    options = dict(port=args.port, rest_port=args.rest_port, poll_seconds=args.poll_seconds,
                   gpu_memory_fraction=fraction, xla=xla)
    if runtime == "binary":
        base_path.mkdir(parents=True, exist_ok=True)
        local = base_path / LOCAL_CONFIG_NAME
        local.write_text("# Generated by python -m serving.tfserving from serving/models.config: do not edit.\n"
                         + text_format.MessageToString(configs.map_container_models(config, base_path)))
        return [BINARY, *server_flags(str(local.resolve()), str(batching) if batching else None,
                                      str(monitoring), session_config=str(session), **options)]
    inside = f"{CONTAINER_CONFIG}/"
    return [
        "docker", "run", "--rm", "--gpus", "all",
        "-p", f"{args.port}:{args.port}", "-p", f"{args.rest_port}:{args.rest_port}",
        "-v", f"{base_path.resolve()}:{CONTAINER_MODELS}:ro",
        "-v", f"{config_dir}:{CONTAINER_CONFIG}:ro",
        "--entrypoint", BINARY,
        args.image,
        *server_flags(inside + model_config.name, inside + batching.name if batching else None,
                      inside + monitoring.name, session_config=inside + session.name, **options),
    ]


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m serving.tfserving", description=__doc__.split("\n\n")[0], allow_abbrev=False
    )
    p.add_argument("--dry-run", action="store_true", help="print the command instead of running it")
    p.add_argument(
        "--runtime",
        choices=["auto", "binary", "docker"],
        default="auto",
        help=f"auto: {BINARY} if on PATH, else Docker",
    )
    p.add_argument(
        "--config-dir", default=str(HERE),
        help="directory with models.config, batching.config, monitoring.config, session.config and session_cpu.config"
    )
    p.add_argument(
        "--base-path", default="models", help="local directory that holds <model>/<version>/ (mounted at /models)"
    )
    p.add_argument("--port", type=int, default=8500, help="gRPC port")
    p.add_argument("--rest-port", type=int, default=8501, help="REST and Prometheus port")
    p.add_argument("--no-batching", dest="batching", action="store_false", help="serve without batching.config")
    p.add_argument("--poll-seconds", type=int, default=1, help="--file_system_poll_wait_seconds")
    p.add_argument(
        "--gpu-memory-fraction",
        type=float,
        default=None,
        help=f"--per_process_gpu_memory_fraction (default: {GPU_MEMORY_FRACTION} in Docker, TF's choice for the "
        "binary)",
    )
    p.add_argument(
        "--xla",
        action="store_true",
        help="keep XLA on (--xla_gpu_compilation_enabled in Docker, --xla_cpu_compilation_enabled for the "
        "binary) even when no model under --base-path needs it",
    )
    p.add_argument("--image", default=IMAGE, help="Docker image")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    runtime = args.runtime
    if runtime == "auto":
        runtime = "binary" if shutil.which(BINARY) else "docker"
    try:
        command = build_command(args, runtime)
    except (OSError, ValueError) as e:
        print(f"serving.tfserving: {e}", file=sys.stderr)
        return 2
    print(shlex.join(command), flush=True)
    if args.dry_run:
        return 0
    if shutil.which(command[0]) is None:
        print(
            f"serving.tfserving: {command[0]} not found: install TF Serving or Docker "
            "(or use the embedded server: make serve)",
            file=sys.stderr,
        )
        return 127
    os.execvp(command[0], command)  # TF Serving gets our PID, so signals reach it directly
    return 0  # not reached


if __name__ == "__main__":
    sys.exit(main())
