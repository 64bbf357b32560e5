"""What TensorFlow Serving does with a model on disk, as one place that the exporter (build time) and
the server (run time) both stand on: the version folders, the warm-up file, loading and running a
version with the C API (`LoadSavedModel`, `Session::Run`) and whether it needs XLA's flags.

As TF Serving's own `servables/` beside `model_servers/`: nothing here imports the server, the
exporter, gRPC or TF Serving's service protos at import time.
"""
