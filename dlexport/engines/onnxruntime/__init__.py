from .config import OrtConfig
from .runner import OrtEngine

__all__ = ["OrtConfig", "OrtEngine"]
