"""Latency benchmark: in-process, seed-notebook and gRPC figures side by side."""
