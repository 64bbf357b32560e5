"""python -m bench.gpu_check: where the explain path runs under TF Serving, and what it costs, in one run.

1. Exports the backbone (ResNet50 with random weights; the same weights every time) with gradcam in
   each --precision (float32, bfloat16, float16), with and without --jit-compile.
2. Times predict vs gradcam through TF Serving's loader (serving/servables/session.py: LoadSavedModel, then
   Session::Run) at batch 1, 8 and 64, round-robin, medians.
3. Loads each float32/bfloat16/float16 export the same way with `log_device_placement` in the session
   config, in one child process, runs `gradcam` once, and lists the device of every explain-path op
   (gradient, pooling, weighting, ReLU, normalisation, resize, casts, PNG encode) from the graphs that
   Session::Run executed. (The placement log itself names only the signature's function calls: their
   bodies are placed when the session inlines them; it is kept in <out>/gpu_check_placement.log.)

Writes <out>/gpu_check.json and <out>/gpu_check.png. Runs on a CPU-only machine too (every op then says
CPU); `--short` (batches 1 and 2, 3 rounds) with a small `--backbone` is the CI-sized run of the tests.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import pathlib
import subprocess
import sys
import tempfile
import time

import numpy as np

from camserve.export.options import PRECISIONS

# Op types of the explain path (after the backbone) -> what they do there. CPU kernels of oneDNN
# builds carry a _Mkl / _MklNative prefix, removed before the lookup.
EXPLAIN_OPS = {
    "MatMul": "head forward/backward (dense)",
    "BroadcastTo": "gradient of global average pooling",
    "Tile": "gradient of global average pooling",
    "Mean": "gradient pooling over space",
    "Mul": "channel weighting (w_k A_k)",
    "Sum": "sum over channels",
    "Relu": "ReLU",
    "Max": "per-image maximum",
    "DivNoNan": "normalisation",
    "ResizeBilinear": "bilinear resize",
    "Cast": "casts (uint8 pixels; reduced precision <-> float32)",
    "EncodePng": "PNG encode (TensorFlow has no GPU kernel for it)",
}


def op_type(op: str) -> str:
    for prefix in ("_MklNative", "_Mkl"):
        if op.startswith(prefix):
            return op[len(prefix):]
    return op


def _placement_child(model_dirs: list[str], image_size: int) -> None:
    """In the child: load each model with TF Serving's loader and log_device_placement, run gradcam
    once, and print {model_dir: {op type: {device: count}}} of the executed graphs as the last line."""
    from tensorflow.core.protobuf import config_pb2

    from camserve.serving.servables.session import SavedModelSession

    config = config_pb2.ConfigProto(log_device_placement=True)
    inputs = {"images": np.zeros((2, image_size, image_size, 3), np.uint8), "class_index": np.array([-1, 0], np.int32)}
    report = {}
    for model_dir in model_dirs:
        metadata = config_pb2.RunMetadata()
        with SavedModelSession(model_dir, config=config.SerializeToString()) as session:
            session.run_signature("gradcam", inputs, options=config_pb2.RunOptions(output_partition_graphs=True),
                                  metadata=metadata)
        devices: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
        for graph in metadata.partition_graphs:
            for node in graph.node:
                devices[op_type(node.op)][node.device.rpartition("device:")[2] or "?"] += 1
        report[model_dir] = {op: dict(counts) for op, counts in devices.items()}
    sys.stdout.flush()
    print("\n" + json.dumps(report))


def placement_report(model_dirs: list[pathlib.Path], image_size: int,
                     log: pathlib.Path) -> dict[str, dict[str, dict[str, int]]]:
    """{model_dir: {op type: {device: node count}}} of one gradcam Session::Run per model, from one
    child process (TensorFlow's placement log goes to its stderr, written to `log`)."""
    dirs = [str(d) for d in model_dirs]
    code = f"from bench.gpu_check import _placement_child; _placement_child({dirs!r}, {image_size})"
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="0")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=600,
                         cwd=pathlib.Path(__file__).resolve().parent.parent)
    log.write_text(f"=== {', '.join(dirs)}\n{run.stdout}{run.stderr}")
    if run.returncode:
        raise RuntimeError(f"placement run failed ({run.returncode}); see {log}:\n{run.stderr[-2000:]}")
    return json.loads(run.stdout.strip().splitlines()[-1])


def explain_path(devices: dict[str, dict[str, int]]) -> dict[str, dict[str, int]]:
    return {op: devices[op] for op in EXPLAIN_OPS if op in devices}


def chart(timings: dict[str, dict[str, float]], batches: list[int], path: pathlib.Path) -> None:
    """gradcam/predict per configuration (bars per batch size), with predict's latency on each bar."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    configs = list(dict.fromkeys(key.rsplit(" b", 1)[0] for key in timings))
    fig, ax = plt.subplots(figsize=(10, 4.5))
    width = 0.8 / len(batches)
    for i, batch in enumerate(batches):
        x = np.arange(len(configs)) + (i - (len(batches) - 1) / 2) * width
        rows = [timings[f"{c} b{batch}"] for c in configs]
        bars = ax.bar(x, [r["gradcam"] / r["predict"] for r in rows], width=width, label=f"batch {batch}")
        for bar, row in zip(bars, rows):
            ax.annotate(f"{row['predict']:.3g} ms", (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                        ha="center", va="bottom", fontsize=6, rotation=90)
    ax.axhline(1.0, color="grey", lw=0.8)
    ax.set_xticks(np.arange(len(configs)), configs)
    ax.set_ylabel("gradcam / predict (median)")
    ax.set_title("Grad-CAM cost over predict through TF Serving's loader (predict's median on each bar)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.gpu_check", description=__doc__.split("\n")[0])
    p.add_argument("--backbone", default="resnet50", help="keras.applications name or .keras file")
    p.add_argument("--batches", help="comma list (default 1,8,64; --short: 1,2)")
    p.add_argument("--repeats", type=int, help="rounds per batch size (default 20; --short: 3)")
    p.add_argument("--precisions", default=",".join(PRECISIONS))
    p.add_argument("--short", action="store_true", help="the CI-sized run: batches 1,2, 3 rounds")
    p.add_argument("--out", default="bench")
    args = p.parse_args(argv)
    args.batches = [int(b) for b in (args.batches or ("1,2" if args.short else "1,8,64")).split(",")]
    args.repeats = args.repeats or (3 if args.short else 20)
    args.precisions = [p.strip() for p in args.precisions.split(",")]
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.perf_counter()
    # TensorFlow takes nearly all of a GPU's memory at its first op unless told to grow: this process
    # and the placement child both need some.
    os.environ.setdefault("TF_FORCE_GPU_ALLOW_GROWTH", "true")

    import keras
    import tensorflow as tf

    from camserve.export.pipeline import export_savedmodel
    from camserve.serving.servables.session import SavedModelSession

    from .inprocess import round_robin, signature_calls

    gpus = tf.config.list_physical_devices("GPU")
    details = [tf.config.experimental.get_device_details(d) for d in gpus]
    print(f"TensorFlow {tf.__version__} sees GPUs: {details or 'none'}")
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    log = out / "gpu_check_placement.log"
    work = pathlib.Path(tempfile.mkdtemp(prefix="gpu_check_"))
    weights = "none"
    if not args.backbone.endswith(".keras"):  # one set of random weights for every export
        keras.utils.set_random_seed(0)
        from camserve.export.backbone import load_model

        model, _ = load_model(args.backbone, "none", None)
        weights = str(work / "weights.weights.h5")
        model.save_weights(weights)
    results: dict = {"gpus": [str(d) for d in details], "tensorflow": tf.__version__, "backbone": args.backbone,
                     "batches": args.batches, "repeats": args.repeats, "placement": {}, "timings": {}}
    rng = np.random.default_rng(0)
    placed: dict[str, pathlib.Path] = {}  # precision -> its export without XLA, for the placement report
    for precision in args.precisions:
        for jit in (False, True):
            name = precision + (" xla" if jit else "")
            model_dir = export_savedmodel(
                backbone=args.backbone,
                weights=weights,
                methods=["gradcam"],
                model_name=name.replace(" ", "_"),
                base_path=str(work),
                jit_compile=jit,
                precision=precision,
                warmup_batch_sizes=(1,),
                feature_maps=0,
                log=lambda message: None,
            )
            print(f"[{time.perf_counter() - started:5.0f}s] exported {name}", flush=True)
            with SavedModelSession(model_dir) as session:
                size = session.signature_defs["predict"].inputs["images"].tensor_shape.dim[1].size
                if not jit:
                    placed[precision] = model_dir
                images = rng.integers(0, 256, (max(args.batches), size, size, 3), dtype=np.uint8)
                for batch in args.batches:
                    calls = signature_calls(session, ["predict", "gradcam"], batch, images, [b""])
                    times = round_robin(calls, args.repeats, warmup=2)
                    medians = {k: float(np.median(v)) * 1000 for k, v in times.items()}
                    results["timings"][f"{name} b{batch}"] = medians
                    print(
                        f"{name:13s} batch {batch:3d}: predict {medians['predict']:9.2f} ms  "
                        f"gradcam {medians['gradcam']:9.2f} ms  ({medians['gradcam'] / medians['predict']:.3f}x)",
                        flush=True,
                    )
    devices = placement_report(list(placed.values()), size, log)
    for precision, model_dir in placed.items():
        results["placement"][precision] = devices[str(model_dir)]
        print(f"{precision}: explain-path ops of gradcam under Session::Run (nodes per device):")
        for op, found in explain_path(results["placement"][precision]).items():
            print(f"  {op:<15s} {EXPLAIN_OPS[op]:<52s} {found}")
    results["seconds"] = round(time.perf_counter() - started, 1)
    (out / "gpu_check.json").write_text(json.dumps(results, indent=1))
    chart(results["timings"], args.batches, out / "gpu_check.png")
    print(f"wrote {out / 'gpu_check.json'}, {out / 'gpu_check.png'} and {log} in {results['seconds']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
