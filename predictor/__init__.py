"""qwen-vl-predictor: a KServe model server that describes images with Qwen-VL models."""

__version__ = "0.1.0"
