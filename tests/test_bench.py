"""`python -m bench` end to end on the small shapes model: every configuration runs, nothing fails.

The figures themselves are not asserted (timings belong to `make bench`, not to tests); this checks
that the benchmark measures what it says: each row has calls, the gRPC rows got no errors and the
compact responses are smaller than the full ones, and the headline ratios are computed.
"""

from __future__ import annotations

import json
import math

import bench.__main__ as bench
from bench import gpu_check
from servers import free_port
from serving import configs
from serving.server import EmbeddedServer, ServerOptions


def test_bench_runs_every_configuration(fused_export, tmp_path):
    # The fused export: two methods and no feature maps, so the server's warm-up is short.
    config = configs.single_model_config("shapes", str(fused_export.parent))
    batching = configs.read_batching_parameters(bench.SAMPLE.parent.parent / "serving" / "batching_cpu.config")
    server = EmbeddedServer(config, ServerOptions(port=0, rest_api_port=free_port(), batching=batching,
                                                  file_system_poll_wait_seconds=0))
    port = server.start()
    try:
        assert (
            bench.main([
                "--server", f"localhost:{port}", "--rest", f"localhost:{server.rest_port}", "--model", "shapes",
                "--model-dir", str(fused_export.parent), "--methods", "gradcam,layercam", "--skip-seed", "--repeats",
                "3", "--seconds", "0.3", "--out", str(tmp_path)
            ])
            == 0
        )
    finally:
        server.stop(grace=1)
    results = json.loads((tmp_path / "results.json").read_text())
    assert (tmp_path / "latency.png").stat().st_size > 0
    rows = {r["name"]: r for r in results["rows"]}
    expected = {
        f"in-process {s} b{b}" for s in ("predict", "gradcam", "layercam", "predict_bytes", "gradcam_bytes")
        for b in (1, 8)
    }
    expected |= {bench.config_name(c) for c in bench.grpc_configs(["gradcam", "layercam"])}
    expected |= {bench.config_name(c) + " interleaved" for c in bench.grpc_configs(["gradcam", "layercam"])[:3]}
    expected |= {f"{kind} gradcam_bytes b1 c1 all outputs interleaved" for kind in ("grpc", "rest")}
    assert set(rows) == expected
    for name, row in rows.items():
        assert row["n"] > 0 and row["p50_ms"] > 0 and not row.get("errors"), (name, row)
    for signature, outputs in (("predict_bytes", "summary"), ("gradcam_bytes", "heatmap_png_bytes")):
        assert rows[f"grpc {signature} b1 c16 out={outputs}"]["in_process_b8_images_per_s"] > 0
    compact = rows["grpc gradcam_bytes b1 c1 out=heatmap_png_bytes"]["response_bytes"]
    assert 0 < compact < rows["grpc gradcam_bytes b1 c1 out=all"]["response_bytes"]
    # JSON text of every output (b64 PNG, the float heatmap as decimals) is larger than protobuf.
    rest, grpc_ = (rows[f"{kind} gradcam_bytes b1 c1 all outputs interleaved"] for kind in ("rest", "grpc"))
    assert rest["response_bytes"] > grpc_["response_bytes"] > compact
    assert len(results["ratios"]) == 11  # 13 with the seed notebook's way
    for name, ratio in results["ratios"].items():  # each with the figures it divides, as printed
        assert math.isfinite(ratio["value"]) and ratio["value"] > 0 and " / " in ratio["figures"], (name, ratio)


def test_bench_measures_every_method_of_the_model_by_default(fused_export, tmp_path, capsys):
    """Without --methods, the cost of every explain method the model has, against predict, at batch 1 and 8."""
    assert (
        bench.main([
            "--server", "", "--model-dir", str(fused_export.parent), "--skip-seed", "--repeats", "2", "--out",
            str(tmp_path)
        ])
        == 0
    )
    ratios = json.loads((tmp_path / "results.json").read_text())["ratios"]
    printed = capsys.readouterr().out
    for method in ("gradcam", "layercam", "gradcam_fused", "layercam_fused"):
        for batch in (1, 8):
            name = f"in-process {method}/predict b{batch}"
            assert ratios[name]["value"] > 0
            assert f"{name:<72s} {ratios[name]['value']:6.3f}  = {ratios[name]['figures']}" in printed


def test_gpu_check_runs_to_completion_on_a_cpu(shapes_model, tmp_path):
    """`make gpu-check` in its short mode on the small model: every precision with and without XLA is
    exported and timed through TF Serving's loader, and the explain path's ops are listed with their
    device (on this machine, the CPU)."""
    import shutil
    import subprocess

    import pytest

    from serving.gpu import tensorflow_gpus

    if shutil.which("make") is None:
        pytest.skip("make is not installed")
    args = f"--short --backbone {shapes_model} --out {tmp_path}"
    run = subprocess.run(
        ["make", "-s", "-o", "venv", "gpu-check", f"GPU_CHECK_ARGS={args}"],
        cwd=bench.SAMPLE.parent.parent,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    results = json.loads((tmp_path / "gpu_check.json").read_text())
    assert (tmp_path / "gpu_check.png").stat().st_size > 0
    configs_run = [f"{p}{x} b{b}" for p in ("float32", "bfloat16", "float16") for x in ("", " xla") for b in (1, 2)]
    assert list(results["timings"]) == configs_run
    for medians in results["timings"].values():
        assert set(medians) == {"predict", "gradcam"} and all(ms > 0 for ms in medians.values())
    device = "GPU" if tensorflow_gpus() else "CPU"
    for precision in ("float32", "bfloat16", "float16"):
        path = gpu_check.explain_path(results["placement"][precision])
        # The shapes model's head is global average pooling + dense: its explain path has each of these.
        assert {"MatMul", "Mean", "Einsum", "Relu", "Max", "DivNoNan", "ResizeBilinear", "Cast", "EncodePng"} <= set(
            path
        )
        if device == "CPU":
            assert all(set(found) == {"CPU:0"} for found in path.values()), path
    # The session ran with log_device_placement (its log names the signature's function calls), kept in a file.
    assert (
        "(StatefulPartitionedCall): /job:localhost/replica:0/task:0/device:"
        in (tmp_path / "gpu_check_placement.log").read_text()
    )
    assert "/job:localhost" not in run.stdout
