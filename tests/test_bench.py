"""`python -m bench` end to end on the small shapes model: every configuration runs, nothing fails.

The figures themselves are not asserted (timings belong to `make bench`, not to tests); this checks
that the benchmark measures what it says: each row has calls, the gRPC rows got no errors and the
compact responses are smaller than the full ones, and the headline ratios are computed.
"""

from __future__ import annotations

import json
import math

import pytest

import camserve.bench.__main__ as bench
from camserve.bench import gpu_check
from camserve.serving import configs
from camserve.serving.server import EmbeddedServer, ServerOptions
from servers import free_port

pytestmark = pytest.mark.slow  # make test runs them, make test-quick does not


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
                "--model-dir", str(fused_export.parent), "--methods", "gradcam,layercam", "--skip-eager", "--repeats",
                "3", "--seconds", "0.3", "--floor-rounds", "0", "--out", str(tmp_path)
            ])
            == 0
        )
    finally:
        server.stop(grace=1)
    results = json.loads((tmp_path / "results.json").read_text())
    assert (tmp_path / "latency.png").stat().st_size > 0
    rows = {r["name"]: r for r in results["rows"]}
    # Every call as the client makes it: explain_bytes with the method (or predict) in each row.
    calls = {m: f"explain_bytes:{m}" for m in ("gradcam", "layercam", "predict")}
    expected = {f"in-process {c} b{b}" for c in ("explain:predict", "explain:gradcam", "explain:layercam",
                                                 "explain_bytes:predict", "explain_bytes:gradcam") for b in (1, 8)}
    expected |= {bench.config_name(c) for c in bench.grpc_configs(calls, ["gradcam", "layercam"])}
    expected |= {bench.config_name(c) + " interleaved" for c in bench.grpc_configs(calls, ["gradcam", "layercam"])[:3]}
    expected |= {"grpc explain_bytes:gradcam b1 c1 all outputs interleaved", "rest explain_bytes b1 c1 all outputs "
                 "interleaved", "grpc explain_bytes:gradcam b1 c1 compact interleaved",
                 "rest explain_compact b1 c1 compact interleaved"}
    assert set(rows) == expected
    for name, row in rows.items():
        assert row["n"] > 0 and row["p50_ms"] > 0 and not row.get("errors"), (name, row)
    for call, outputs in (("explain_bytes:predict", "summary"), ("explain_bytes:gradcam", "heatmap_png_bytes")):
        assert rows[f"grpc {call} b1 c16 out={outputs}"]["in_process_b8_images_per_s"] > 0
    compact = rows["grpc explain_bytes:gradcam b1 c1 out=heatmap_png_bytes"]["response_bytes"]
    assert 0 < compact < rows["grpc explain_bytes:gradcam b1 c1 out=all"]["response_bytes"]
    # JSON text of every output (b64 PNG, the float heatmap as decimals) is larger than protobuf.
    rest = rows["rest explain_bytes b1 c1 all outputs interleaved"]
    grpc_ = rows["grpc explain_bytes:gradcam b1 c1 all outputs interleaved"]
    assert rest["response_bytes"] > grpc_["response_bytes"] > compact
    # The compact signature answers REST with the labels, scores and PNG: far less than every output,
    # and the same outputs as gRPC's compact call.
    rest_compact = rows["rest explain_compact b1 c1 compact interleaved"]["response_bytes"]
    grpc_compact = rows["grpc explain_bytes:gradcam b1 c1 compact interleaved"]["response_bytes"]
    assert grpc_compact < rest_compact < rest["response_bytes"] / 4
    assert len(results["ratios"]) == 12  # 14 with the eager Grad-CAM baseline (no --skip-eager)
    for name, ratio in results["ratios"].items():  # each with the figures it divides, as printed
        assert math.isfinite(ratio["value"]) and ratio["value"] > 0 and " / " in ratio["figures"], (name, ratio)


def test_bench_measures_every_method_of_the_model_by_default(fused_export, tmp_path, capsys):
    """Without --methods, the cost of every explain method the model has, against predict, at batch 1 and 8."""
    assert (
        bench.main([
            "--server", "", "--model-dir", str(fused_export.parent), "--skip-eager", "--repeats", "2",
            "--floor-rounds", "0", "--out", str(tmp_path)
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


def test_floor_is_measured_against_minimal_models_that_compute_the_same(fused_export, shapes_model, tmp_path,
                                                                        capsys):
    """The floor phase on the shapes model, built from its .keras file (the export's own weights): every call
    of each batch is timed, the ratios are finite, and the minimal models compute what our signatures do."""
    import numpy as np

    import synthetic
    from camserve.bench import floor
    from camserve.serving.servables.session import SavedModelSession

    assert bench.main([
        "--server", "", "--model-dir", str(fused_export.parent), "--backbone", str(shapes_model), "--methods",
        "gradcam,layercam", "--skip-eager", "--repeats", "1", "--floor-rounds", "3", "--out", str(tmp_path)
    ]) == 0
    results = json.loads((tmp_path / "results.json").read_text())
    printed = capsys.readouterr().out
    summary = results["floor"]
    assert summary["methods"] == ["gradcam", "layercam"] and summary["target_layer"] == "last_conv"
    calls = ["plain forward", "our predict", "minimal gradcam", "our gradcam", "our layercam"]
    rows = {r["name"]: r for r in results["rows"] if r["kind"] == "floor"}
    assert set(rows) == {f"floor {name} b{batch}" for name in calls for batch in (1, 8)}
    assert all(r["n"] == 3 and r["p50_ms"] > 0 for r in rows.values()), rows
    for batch in (1, 8):
        assert list(summary[f"b{batch}"]["medians_ms"]) == calls
        assert all(ms > 0 for ms in summary[f"b{batch}"]["medians_ms"].values())
        ratios = summary[f"b{batch}"]["ratios"]
        assert list(ratios) == ["minimal gradcam / plain forward", "our gradcam / our predict",
                                "our layercam / our predict", "our predict / plain forward"]
        for key, ratio in ratios.items():
            assert math.isfinite(ratio["value"]) and ratio["value"] > 0, (key, ratio)
            name = f"floor {key} b{batch}"
            assert results["ratios"][name] == ratio
            assert f"{name:<72s} {ratio['value']:6.3f}  = {ratio['figures']}" in printed
    assert summary["heatmap_max_abs_diff"] < 1e-4 and summary["phase_s"] > summary["build_s"] > 0

    # Images whose maps are not flat (a shape on noise): the same heatmaps and probabilities as ours.
    images = synthetic.dataset(4, seed=7)[0]
    with SavedModelSession(fused_export) as ours, \
            floor.minimal_models(str(shapes_model), "auto", "", (synthetic.SIZE, synthetic.SIZE)) as minimal:
        heatmaps = ours.run_signature("gradcam", {"images": images, "class_index": np.full(4, -1, np.int32)},
                                      ["heatmap"])["heatmap"]
        assert (heatmaps.max(axis=(1, 2)) > 0.5).all() and heatmaps.min() == 0.0  # peaks < 1 after the resize
        np.testing.assert_allclose(minimal.gradcam.run_signature("gradcam", {"images": images})["heatmap"], heatmaps,
                                   atol=1e-4)
        probabilities = ours.run_signature("predict", {"images": images}, ["probabilities"])["probabilities"]
        np.testing.assert_allclose(minimal.forward.run_signature("predict", {"images": images})["probabilities"],
                                   probabilities, atol=1e-5)


def test_gpu_check_runs_to_completion_on_a_cpu(shapes_model, tmp_path):
    """`make gpu-check` in its short mode on the small model: every precision with and without XLA is
    exported and timed through TF Serving's loader, and the explain path's ops are listed with their
    device (on this machine, the CPU)."""
    import shutil
    import subprocess

    import pytest

    from camserve.serving.gpu import tensorflow_gpus

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
        expected = {"MatMul", "Mean", "Mul", "Sum", "Relu", "Max", "DivNoNan", "ResizeBilinear", "Cast", "EncodePng"}
        assert expected <= set(path)
        if device == "CPU":
            assert all(set(found) == {"CPU:0"} for found in path.values()), path
    # The session ran with log_device_placement (its log names the signature's function calls), kept in a file.
    assert (
        "(StatefulPartitionedCall): /job:localhost/replica:0/task:0/device:"
        in (tmp_path / "gpu_check_placement.log").read_text()
    )
    assert "/job:localhost" not in run.stdout


def test_cold_start_times_every_warmup_record_and_first_call(fused_export, tmp_path):
    """`python -m bench.cold_start` on the shapes model: the replay, under each session config, is split
    into executor builds and repeats as the session keys its executors, and a fresh server's first calls
    are timed, one per method and kind of image as the client makes them."""
    from camserve.bench import cold_start

    assert cold_start.main(["--model", "shapes", "--model-dir", str(fused_export.parent), "--rounds", "1",
                            "--runs", "1", "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "cold_start.json").read_text())
    assert list(result["time_to_ready"]) == list(cold_start.CONFIGS)
    for rounds in result["time_to_ready"].values():
        [breakdown] = rounds["ours"]
        records = breakdown["records"]
        keys = {(r["signature"], tuple(r["outputs"])) for r in records}
        assert len(records) > breakdown["executors"] == len(keys) == 2  # explain_bytes, explain_fused_bytes
        assert breakdown["ready_s"] == breakdown["load_s"] + sum(r["seconds"] for r in records)
    [run] = result["runs"]
    assert run["ready_s"] > 0 and any("warm-up requests" in line for line in run["server_log"])
    expected = {"predict", "predict (array)", *(f"{m}{kind}" for m in ("gradcam", "layercam", "gradcam_fused",
                                                                       "layercam_fused") for kind in ("", " (array)")),
                "explain_compact (REST, every output)", "explain_fused_compact (REST, every output)"}
    assert set(run["first_calls"]) == expected
    for name, call in run["first_calls"].items():
        assert call["first_ms"] > 0 and call["next_median_ms"] > 0, name


def test_session_settings_times_each_default_call_under_both_settings(fused_export, capsys):
    from camserve.bench import session_settings

    assert session_settings.main([str(fused_export.parent), "--methods", "gradcam,layercam", "--rounds", "2"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[:2] for line in lines] == [
        [f"b{batch}", f"explain_bytes:{method}"] for batch in (1, 8) for method in ("predict", "gradcam", "layercam")]
    assert all(float(line.split("ratio ")[1].split()[0]) > 0 for line in lines)
