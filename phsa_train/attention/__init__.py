"""PHSA attention: public API.

``phsa_attention`` / ``select_blocks`` dispatch between the PyTorch reference and the Triton kernels;
``attention_recall`` and the activation ratios measure what a selection keeps.
"""

from .api import phsa_attention, select_blocks
from .params import PHSAParams
from .phsa import phsa_reference
from .recall import attention_recall
from .sparsity import activation_ratio, causal_activation_ratio, measured_activation

__all__ = [
    "PHSAParams",
    "activation_ratio",
    "attention_recall",
    "causal_activation_ratio",
    "measured_activation",
    "phsa_attention",
    "phsa_reference",
    "select_blocks",
]
