"""PyTorch CSM checkpoints (Sesame's original layout, transformers' layout) <-> csm-jax Orbax checkpoints.

    python -m convert SRC OUT [--dtype keep|float32|bfloat16] [--to orbax|transformers|original] [--config PATH]
"""

from convert.from_torch import convert_to_orbax
from convert.io import ConversionError
from convert.layouts import LayoutError
from convert.to_torch import export_checkpoint

__all__ = ["ConversionError", "LayoutError", "convert_to_orbax", "export_checkpoint"]
