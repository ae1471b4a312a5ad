"""Serving on NVIDIA Triton Inference Server: a model repository whose Python-backend model calls the runtime
(repository.py, backend.py), the environment and process of ``tritonserver`` (environment.py, server.py), and a
``tritonclient`` helper (client.py). Nothing here imports Triton at import time."""
