"""python -m bench.session_settings MODEL_DIR: what serving/'s session settings cost in steady state.

They drop Grappler passes to cut the time to ready (bench/cold_start.py); this checks that calls do not
get slower for it. The same version is loaded twice through TF Serving's loader in one process, under
TensorFlow's default settings and under this machine's file (serving/session_cpu.config without a GPU,
serving/session.config with one), and the client's default calls (explain_bytes: predict, each method)
are interleaved round by round at batch 1 and 8; prints the p50s and the median of per-round ratios.
"""

from __future__ import annotations

import argparse
import pathlib

import numpy as np

from .__main__ import SAMPLE, latest_version
from .inprocess import round_robin, signature_calls


def main(argv: list[str] | None = None) -> int:
    from camserve.serving.servables.session import SavedModelSession
    from camserve.serving.servables.session_config import session_config

    p = argparse.ArgumentParser(prog="python -m bench.session_settings", description=__doc__.split("\n")[0])
    p.add_argument("model_dir", help="an exported model's folder: its latest version is loaded")
    p.add_argument("--methods", default="gradcam,cam")
    p.add_argument("--rounds", type=int, default=30)
    args = p.parse_args(argv)
    version = latest_version(pathlib.Path(args.model_dir))
    calls = [f"explain_bytes:{m}" for m in ["predict", *args.methods.split(",")]]
    jpeg = SAMPLE.read_bytes()
    with SavedModelSession(version) as defaults, SavedModelSession(version, config=session_config()) as ours:
        for batch in (1, 8):
            timed = {(label, name): call for label, session in (("defaults", defaults), ("ours", ours))
                     for name, call in signature_calls(session, calls, batch, None, [jpeg]).items()}
            times = {key: np.array(t) for key, t in round_robin(timed, args.rounds).items()}
            for name in calls:
                base, ours_ = times["defaults", name], times["ours", name]
                print(f"b{batch} {name:<28s} TensorFlow's defaults {np.median(base) * 1e3:7.1f} ms, serving/ settings "
                      f"{np.median(ours_) * 1e3:7.1f} ms, ratio {np.median(ours_ / base):.3f} (median of per-round)")
    return 0


if __name__ == "__main__":
    import os
    import sys

    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    sys.exit(main())
