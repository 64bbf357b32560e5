"""Thin client of a CAM / Grad-CAM model served by TensorFlow Serving (gRPC PredictionService).

Needs only grpcio, protobuf, numpy and OpenCV: importing it does not import TensorFlow.

    from client import CamClient
    with CamClient("localhost:8500", model="efficientnet_lite0_cam") as c:
        e = c.explain("samples/chelsea.png", method="gradcam")
        print(e.top_k, e.class_label, e.heatmap.shape)
"""
from .api import GUIDED_PNG, CamClient, CamServingError, Explanation, Prediction, RetryPolicy, tls_credentials

__all__ = ["GUIDED_PNG", "CamClient", "CamServingError", "Explanation", "Prediction", "RetryPolicy", "tls_credentials"]
