"""sdort.export: turn a diffusers checkpoint into the ONNX artifact that sdort.runtime reads (needs torch)."""

from .exporter import export

__all__ = ["export"]
