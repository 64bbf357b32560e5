"""Export a Keras classifier as a SavedModel whose signatures return predictions and CAM heatmaps.

    from camserve.export import ExportOptions, export_savedmodel
    export_savedmodel(ExportOptions(backbone="efficientnet_lite0", weights="auto", methods=("gradcam", "cam"),
                                    model_name="efficientnet_lite0_cam"))

The names load on first use, so that the run-time modules under export/ (the TF Serving loader, the
image decoder) do not pull in Keras.
"""

from __future__ import annotations

import importlib

_PUBLIC = {
    "export_savedmodel": ".pipeline",
    "ExportOptions": ".options",
    "METHODS": ".methods",
    "Method": ".methods",
    "Evidence": ".methods",
}
__all__ = list(_PUBLIC)


def __getattr__(name: str):
    if name not in _PUBLIC:
        raise AttributeError(f"module 'export' has no attribute {name!r}")
    return getattr(importlib.import_module(_PUBLIC[name], __name__), name)
