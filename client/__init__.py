"""Thin client of a CAM / Grad-CAM model served by TensorFlow Serving (gRPC PredictionService).

Needs only grpcio, protobuf, numpy and OpenCV: importing it does not import TensorFlow.

    from camserve.client import CamClient
    with CamClient("localhost:8500", model="efficientnet_lite0_cam") as c:
        e = c.explain("samples/chelsea.png", method="gradcam")
        print(e.top_k, e.class_label, e.heatmap.shape)

The names load on first use: the exporter reads the facts it shares with the client (`outputs`,
`image_header`) without importing gRPC.
"""
from __future__ import annotations

import importlib

__all__ = ["CamClient", "CamServingError", "Explanation", "Prediction", "RetryPolicy", "tls_credentials"]


def __getattr__(name: str):
    if name not in __all__:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(".api", __name__), name)
