"""TensorRT backend (standard TensorRT 10.x and TensorRT for RTX): per-subgraph engine builds and their runner.

Nothing here imports TensorRT at module import time; ``compat.load_flavour`` does, when a build or a load needs it.
"""
