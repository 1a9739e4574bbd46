"""Shims for Triton 3.6.0's CPU interpreter (TRITON_INTERPRET=1): the CPU tests run the PHSA kernels through it.

Test-only: the shipped kernels never load this file. ``enable()`` turns the interpreter on (before any kernel
module is imported: ``triton.jit`` picks the interpreter at decoration time) and applies ``patch()``; the CPU
kernel tests and the context-parallel test worker call it.

Interpreter bugs of Triton 3.6.0 met by these kernels (none of them exists on the GPU):
1. A loop bound computed from a loaded scalar goes through ``int(array)`` on a 1-element (not 0-d) array,
   which numpy >= 2.4 refuses ("only 0-dimensional arrays can be converted to Python scalars"; upstream
   triton-lang/triton#9171).
2. ``tl.dot`` on bf16 operands multiplies their raw uint16 storage (bf16 is kept as uint16 there): garbage
   (upstream triton-lang/triton#11584; the fix, #11585, was declined: bf16 is unsupported in the interpreter).
3. fp32 -> bf16 / fp16 -> bf16 casts truncate instead of rounding to nearest even as the GPU does.
4. (speed) ``tl.sort`` runs its bitonic network through generic reductions: minutes for one small kernel.
``patch()`` fixes the four inside the interpreter (dot: bf16 operands are widened to fp32, which is exact for
the products, the accumulation being fp32 as on the GPU; casts: through torch, round-to-nearest-even). The
patch replaces ``tl.sort`` process-wide, so it must not be applied in a process that compiles for the GPU.
Version guard: written against triton 3.6.0 (pinned in pyproject.toml); another version raises, so the shims
are re-checked (and dropped where fixed) when the pin moves.
"""

from __future__ import annotations

import os

PATCHED_TRITON = "3.6.0"
_done = False


def enable() -> None:
    """Run Triton kernels imported from now on in the CPU interpreter, with the shims below."""
    os.environ["TRITON_INTERPRET"] = "1"
    patch()


def patch() -> None:
    global _done
    if _done:
        return
    import numpy as np  # noqa: PLC0415
    import torch  # noqa: PLC0415
    import triton  # noqa: PLC0415
    import triton.language as tl  # noqa: PLC0415
    import triton.runtime.interpreter as interp  # noqa: PLC0415

    if triton.__version__ != PATCHED_TRITON:
        raise RuntimeError(f"tests/triton_interpreter.py patches triton {PATCHED_TRITON}'s interpreter; found "
                           f"{triton.__version__}: re-check each shim against that version")

    orig_tensor = interp._patch_lang_tensor

    def _patched_tensor(tensor, scope):
        orig_tensor(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    interp._patch_lang_tensor = _patched_tensor

    B = interp.InterpreterBuilder

    def _widen(h):
        if h.dtype.scalar == tl.bfloat16:
            u = h.data.astype(np.uint32) << 16
            return u.view(np.float32)
        return h.data

    def create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        if a.dtype.scalar == tl.bfloat16 or b.dtype.scalar == tl.bfloat16:
            out = np.matmul(_widen(a), _widen(b), dtype=np.float32).astype(d.data.dtype) + d.data
            return interp.TensorHandle(out, d.dtype.scalar)
        return _orig_dot(self, a, b, d, input_precision, max_num_imprecise_acc)

    def _to_bf16(h):
        t = torch.from_numpy(np.ascontiguousarray(_widen(h).astype(np.float32)))
        return t.to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)

    def cast_impl(self, src, dst_type):
        if dst_type.scalar == tl.bfloat16 and src.dtype.scalar != tl.bfloat16 and src.dtype.scalar.is_floating():
            return interp.TensorHandle(_to_bf16(src), dst_type.scalar)
        if src.dtype.scalar == tl.bfloat16 and dst_type.scalar != tl.float32 and dst_type.scalar.is_floating():
            return interp.TensorHandle(_widen(src).astype(interp._get_np_dtype(dst_type)), dst_type.scalar)
        return _orig_cast(self, src, dst_type)

    def create_fp_to_fp(self, src, dst_type, rounding_mode):
        if dst_type.scalar == tl.bfloat16 or src.dtype.scalar == tl.bfloat16:
            return cast_impl(self, src, dst_type)
        return _orig_fp_to_fp(self, src, dst_type, rounding_mode)

    _orig_dot, _orig_cast, _orig_fp_to_fp = B.create_dot, B.cast_impl, B.create_fp_to_fp
    B.create_dot = create_dot
    B.cast_impl = cast_impl
    B.create_fp_ext = lambda self, src, dst_type: cast_impl(self, src, dst_type)
    B.create_fp_trunc = lambda self, src, dst_type: cast_impl(self, src, dst_type)
    B.create_fp_to_fp = create_fp_to_fp

    def _np_sort(x, dim=None, descending=tl.core.CONSTEXPR_0, **_):
        data = x.handle.data
        axis = -1 if dim is None else int(getattr(dim, "value", dim))
        out = np.sort(data, axis=axis, kind="stable")
        if bool(getattr(descending, "value", descending)):
            out = np.flip(out, axis=axis).copy()
        return tl.core.tensor(interp.TensorHandle(out, x.handle.dtype), x.type)

    tl.sort = _np_sort
    _done = True
