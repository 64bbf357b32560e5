"""python -m serving.gpu: exit 0 when TensorFlow here sees a GPU, 1 when it does not.

`nvidia-smi` only says the host has an NVIDIA driver. TensorFlow uses the GPU only when its wheel
was built with CUDA and finds the CUDA libraries (`pip install tensorflow[and-cuda]`); a CPU-only
install on a GPU host is common, and would then be given the GPU batching config for no GPU. The
Makefile asks this module (only on hosts where nvidia-smi exists, since importing TensorFlow
takes seconds) which batching config the embedded server gets.
"""

from __future__ import annotations

import os
import sys


def tensorflow_gpus() -> list[str]:
    """Names of the GPUs TensorFlow can use in this environment."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")  # a probe: no CUDA start-up chatter
    import tensorflow as tf

    return [device.name for device in tf.config.list_physical_devices("GPU")]


def main() -> int:
    gpus = tensorflow_gpus()
    print(", ".join(gpus) if gpus else "TensorFlow sees no GPU")
    return 0 if gpus else 1


if __name__ == "__main__":
    sys.exit(main())
