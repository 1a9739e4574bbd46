"""PHSA operator: the reference (oracle) lives here; the Triton kernels in ``phsa_train.attention.phsa.triton``."""

from .reference import (
    attended_mask,
    block_representatives,
    block_scores,
    eligible_blocks,
    phsa_reference,
    score_representatives,
    select_blocks_reference,
    support_rows,
    topk_blocks,
)

__all__ = [
    "attended_mask",
    "block_representatives",
    "block_scores",
    "eligible_blocks",
    "phsa_reference",
    "score_representatives",
    "select_blocks_reference",
    "support_rows",
    "topk_blocks",
]
