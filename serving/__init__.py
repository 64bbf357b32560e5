"""Run time: serve the exported SavedModel over TensorFlow Serving's gRPC API.

`serving.tfserving` builds the command for the real tensorflow_model_server (binary or Docker
image) from the config files beside this module; `python -m serving` is an embedded server with
the same API, flags and error codes for machines without TF Serving.
"""
