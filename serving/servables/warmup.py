"""TF Serving's warm-up file: the PredictRequests it replays when it loads a version."""

from __future__ import annotations

import pathlib
from typing import TYPE_CHECKING, Iterable

if TYPE_CHECKING:
    from tensorflow_serving.apis import predict_pb2

WARMUP_FILE = "assets.extra/tf_serving_warmup_requests"
MAX_WARMUP_RECORDS = 1000  # TF Serving's limit


def read_warmup_requests(export_dir: str | pathlib.Path):
    """The PredictRequests of a version's warm-up file, as TF Serving replays them at load.

    TF Serving replays `assets.extra/tf_serving_warmup_requests` (TFRecord of PredictionLog) before
    it marks a version AVAILABLE, and a record that fails fails the load. Only predict_log records
    are written by our exporter; other kinds are refused here rather than skipped.
    """
    import tensorflow as tf
    from tensorflow_serving.apis import prediction_log_pb2

    path = pathlib.Path(export_dir, WARMUP_FILE)
    if not path.is_file():
        return
    for record in tf.data.TFRecordDataset(str(path)).take(MAX_WARMUP_RECORDS):
        entry = prediction_log_pb2.PredictionLog.FromString(record.numpy())
        kind = entry.WhichOneof("log_type")
        if kind != "predict_log":
            raise ValueError(f"{path}: only predict_log warm-up records are supported, got {kind}")
        yield entry.predict_log.request


def write_warmup_requests(export_dir: str | pathlib.Path, requests: Iterable[predict_pb2.PredictRequest]) -> int:
    """Write `requests` as a version's warm-up file (PredictionLog records); returns how many.

    Refuses more than TF Serving replays: a model whose warm-up it cuts short would be slow at first
    for the calls the records left out."""
    import tensorflow as tf
    from tensorflow_serving.apis import prediction_log_pb2

    path = pathlib.Path(export_dir, WARMUP_FILE)
    path.parent.mkdir(parents=True, exist_ok=True)
    count = 0
    with tf.io.TFRecordWriter(str(path)) as writer:
        for request in requests:
            count += 1
            if count > MAX_WARMUP_RECORDS:
                raise ValueError(f"more than {MAX_WARMUP_RECORDS} warm-up requests: TF Serving replays only that many")
            writer.write(prediction_log_pb2.PredictionLog(
                predict_log=prediction_log_pb2.PredictLog(request=request)).SerializeToString())
    return count
