"""Test helpers for the attention operators."""

from __future__ import annotations

import torch


def assert_close(name: str, ref: torch.Tensor, out: torch.Tensor, ratio: float, atol: float | None = None) -> None:
    """Fail when ``out`` is not close to ``ref``: NaN in either, RMS of the difference above ``ratio`` times the
    RMS of ``ref``, or (when given) a max absolute difference above ``atol``. The message prints all three."""
    assert ref.shape == out.shape, f"{name}: shape {tuple(out.shape)} != reference {tuple(ref.shape)}"
    ref64, out64 = ref.detach().double(), out.detach().double()
    assert not torch.isnan(ref64).any(), f"{name}: NaN in the reference"
    assert not torch.isnan(out64).any(), f"{name}: NaN in the output"
    diff = out64 - ref64
    max_abs = diff.abs().max().item() if diff.numel() else 0.0
    rms_err = diff.pow(2).mean().sqrt().item() if diff.numel() else 0.0
    rms_ref = ref64.pow(2).mean().sqrt().item() if diff.numel() else 0.0
    rel = rms_err / (rms_ref + 1e-30)
    msg = f"{name}: rms-rel {rel:.3e} (limit {ratio:.1e}), max-abs {max_abs:.3e}"
    assert rel <= ratio, msg
    if atol is not None:
        assert max_abs <= atol, msg + f" (max-abs limit {atol:.1e})"
