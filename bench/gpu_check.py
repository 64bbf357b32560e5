"""python -m bench.gpu_check: where the explain path runs, and what it costs on this machine's GPU.

1. Exports ResNet50 (random weights) with gradcam and cam, with and without --jit-compile.
2. Runs `gradcam` once with device-placement logging in a child process and lists, for every op
   of the explain path (gradient, pooling, weighting, ReLU, normalisation, resize), the device
   it was placed on.
3. Times predict vs gradcam in-process at batch 1, 8 and 64 (round-robin, medians), float32 and
   XLA. Writes `<out>/gpu_check.json`. Runs on a CPU-only machine too (then everything says CPU).
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import re
import subprocess
import sys
import tempfile

import numpy as np

# Op types of the explain path (after the backbone): head backward, pooling, weighting, ReLU,
# per-image max and division, bilinear resize, uint8 cast.
EXPLAIN_OPS = {
    "MatMul": "head forward/backward (dense)",
    "Mean": "gradient pooling over space",
    "Einsum": "channel weighting",
    "BatchMatMulV2": "channel weighting",
    "Relu": "ReLU",
    "Max": "per-image maximum",
    "DivNoNan": "normalisation",
    "ResizeBilinear": "bilinear resize",
    "BroadcastTo": "gradient of global average pooling",
    "Tile": "gradient of global average pooling",
}


def placement_report(model_dir: str) -> dict[str, list[str]]:
    """Devices per explain-path op type, from TF's placement log of one gradcam call."""
    code = f"""
import numpy as np, tensorflow as tf
tf.debugging.set_log_device_placement(True)
m = tf.saved_model.load({model_dir!r})
m.signatures["gradcam"](images=np.zeros((2, 224, 224, 3), np.uint8), class_index=np.array([-1, 3], np.int32))
"""
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="0", TF_CPP_MAX_VLOG_LEVEL="0")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=600)
    devices: dict[str, set[str]] = {}
    for line in (run.stdout + run.stderr).splitlines():
        if "device:" not in line:
            continue
        device = re.search(r"device:(\w+):\d+", line)
        for op_type in EXPLAIN_OPS:
            if re.search(rf"\({op_type}\)|\b{op_type}\b", line) and device:
                devices.setdefault(op_type, set()).add(device.group(1))
    return {op: sorted(found) for op, found in devices.items()}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.gpu_check", description=__doc__.split("\n")[0])
    p.add_argument("--batches", default="1,8,64")
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--out", default="bench")
    args = p.parse_args(argv)

    import tensorflow as tf

    from bench.inprocess import round_robin, signature_calls
    from export.savedmodel import export_savedmodel

    gpus = [d.name for d in tf.config.list_physical_devices("GPU")]
    details = [tf.config.experimental.get_device_details(d) for d in tf.config.list_physical_devices("GPU")]
    print(f"GPUs: {gpus or 'none'} {details}")
    work = pathlib.Path(tempfile.mkdtemp(prefix="gpu_check_"))
    results: dict = {"gpus": gpus, "gpu_details": [str(d) for d in details], "tensorflow": tf.__version__, "timings": {}}
    batches = [int(b) for b in args.batches.split(",")]
    images = np.random.default_rng(0).integers(0, 256, (max(batches), 224, 224, 3), dtype=np.uint8)
    for jit in (False, True):
        name = "xla" if jit else "float32"
        model_dir = export_savedmodel(
            "resnet50", "none", ["gradcam", "cam"], f"resnet50_{name}", str(work), jit_compile=jit,
            warmup_batch_sizes=(1,), feature_maps=0,
        )
        if not jit:
            results["placement"] = placement_report(str(model_dir))
            print("explain-path ops and their devices:")
            for op, devices in results["placement"].items():
                print(f"  {op:<16s} {EXPLAIN_OPS[op]:<36s} {', '.join(devices)}")
        model = tf.saved_model.load(str(model_dir))
        for batch in batches:
            calls = signature_calls(model, ["predict", "gradcam", "cam"], batch, images, [b""])
            times = round_robin(calls, args.repeats, warmup=3)
            medians = {k: float(np.median(v)) * 1000 for k, v in times.items()}
            results["timings"][f"{name} b{batch}"] = medians
            print(
                f"{name:8s} batch {batch:3d}: predict {medians['predict']:8.2f} ms  gradcam {medians['gradcam']:8.2f} ms "
                f"({medians['gradcam'] / medians['predict']:.3f}x)  cam {medians['cam']:8.2f} ms "
                f"({medians['cam'] / medians['predict']:.3f}x)"
            )
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu_check.json").write_text(json.dumps(results, indent=1))
    print(f"wrote {out / 'gpu_check.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
