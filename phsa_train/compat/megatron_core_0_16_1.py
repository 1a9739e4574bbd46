"""Work-arounds for Megatron-Core 0.16.1, each named after the upstream behaviour it corrects.

* CUDA hard-coded on paths a CPU run reaches (tests, the demo, CI): ``torch.cuda.current_device()`` in RoPE
  and buffer allocation, ``torch.cuda.synchronize()`` in the distributed-checkpoint writer, and a pinned
  CUDA index in ``get_pos_emb_on_this_cp_rank`` (the CP slice of the RoPE table). :func:`cpu_shims`.
* ``DistributedOptimizer._set_main_param_and_optimizer_states`` copies every key of the live torch-Adam
  state from the loaded tensors, but without Apex/TE torch Adam keeps a per-parameter ``step`` that the
  checkpoint's parameter state never holds (Megatron stores it in the param groups), so every resume fails
  with ``KeyError: 'step'`` (seen on H100, torch 2.11, both fully_reshardable and dp_reshardable).
  :func:`distrib_optimizer_load_fix` copies only the keys the checkpoint provides; Megatron restores
  ``step`` from the param groups itself. Verified on an H100 (2026-11-23): ``launch/pretrain.sh model=tiny
  train.steps=4 checkpoint.interval=2``, then ``train.steps=6`` in the same run dir -> "resumed at step 4",
  steps 5-6 train on (loss 8.20 -> 8.02).
* A fresh Megatron optimizer has no Adam state, and its ``init_state_fn`` creates no per-parameter
  ``step`` without Apex/TE, yet ``sharded_state_dict(is_loading=True)`` needs both:
  :func:`init_optimizer_state`, called by the checkpoint loader.
* The ``torch_dist`` saver keeps one *spawned* ``multiprocessing.Manager`` per rank (a private queue in
  ``filesystem_async``; a fresh interpreter, so default signal actions, and no tie to its rank). Slurm sends
  the stop signals (SIGUSR1 warning, SIGTERM on scancel / preemption) to every process of the job step, and
  torchrun forwards the SIGTERM it gets to each rank's whole process group: either kills the writer, and the
  very save the signal asked for then fails (``BrokenPipeError`` / ``ConnectionRefusedError``, only
  ``iter_*.tmp`` left; seen on a real Slurm and locally). And a rank killed with ``kill -9`` leaves it alive
  for hours. :func:`shield_checkpoint_writer` starts it now, with SIGUSR1, SIGTERM and SIGINT ignored (that
  survives exec) and ``PR_SET_PDEATHSIG`` set in it, so it lives exactly as long as its rank.
* ``config.apply_rope_fusion`` works only with Transformer Engine: ``rope_utils.fused_apply_rotary_pos_emb`` is
  imported from TE's extension and is None without it (``TransformerConfig`` then refuses the flag), so a run
  without TE always takes the unfused RoPE, ~5 elementwise kernels and two copies per q and k.
  :func:`provide_fused_rope` installs our compiled bshd RoPE in that slot (only where TE left it empty), called by
  the model builder when ``train.fused_kernels`` is on.
* ``GPTModel`` has no hook between the decoder's hidden states and the loss: ``_postprocess`` always runs the
  output layer, materialising the [s, b, vocab / tp] logits, then ``compute_language_model_loss`` (whose fp32
  copy of them backward keeps), and Megatron-Core has no fused linear + cross-entropy. :class:`GPTModelWithOutputLoss`
  overrides ``_postprocess`` (an internal: its keyword arguments, and that without multi-token prediction,
  inference, sequence parallelism or deferred embedding wgrad it is exactly "output layer, then loss") so that
  a training loss with labels can come from one ``output_loss(hidden_states, weight, labels, tp_group)`` call;
  every other case is Megatron's own code. Same modules, same parameter names and state-dict keys.
"""
from __future__ import annotations

import multiprocessing
import os
import signal
from multiprocessing.managers import SyncManager

import torch
from megatron.core.models.gpt import GPTModel
from megatron.core.config_logger import has_config_logger_enabled

VERSION = "0.16.1"
_applied: set[str] = set()


def check_version() -> None:
    import megatron.core

    found = getattr(megatron.core, "__version__", "?")
    if found != VERSION:
        raise RuntimeError(f"phsa_train.compat.megatron_core_0_16_1 patches megatron-core {VERSION}, found {found}: "
                           "re-check each work-around against the new version before using it")


def apply(on_gpu: bool) -> None:
    """Apply every work-around this process needs. Idempotent."""
    check_version()
    if on_gpu:
        distrib_optimizer_load_fix()
    else:
        cpu_shims()


def provide_fused_rope(fn) -> None:
    """Make ``fn(t, freqs, interleaved=False)`` Megatron's fused RoPE where Transformer Engine provides none
    (with TE, ``apply_rope_fusion`` keeps using TE's). Idempotent."""
    check_version()
    from megatron.core.models.common.embeddings import rope_utils

    if rope_utils.fused_apply_rotary_pos_emb is None:
        rope_utils.fused_apply_rotary_pos_emb = fn


class GPTModelWithOutputLoss(GPTModel):
    """Megatron's GPTModel whose training loss may be one ``output_loss`` call on the final hidden states.

    ``output_loss(hidden_states [s, b, h], weight [V / tp, h], labels [b, s], tp_group) -> losses [b, s]`` replaces
    ``output_layer`` + ``compute_language_model_loss`` when labels are given; ``None`` keeps Megatron's path.
    Calls without labels (evaluation, inference) always return Megatron's logits.
    """

    def __init__(self, *args, output_loss=None, **kwargs):
        check_version()
        super().__init__(*args, **kwargs)
        self.output_loss = output_loss

    def _megatron_postprocess_needed(self, labels, mtp_in_postprocess, inference_context) -> bool:
        c = self.config
        return (self.output_loss is None or labels is None or not self.post_process or bool(mtp_in_postprocess)
                or c.mtp_num_layers is not None or inference_context is not None or self.output_layer.sequence_parallel
                or c.defer_embedding_wgrad_compute or has_config_logger_enabled(c))

    def _postprocess(self, hidden_states, labels=None, mtp_in_postprocess=None, inference_context=None, **kwargs):
        if self._megatron_postprocess_needed(labels, mtp_in_postprocess, inference_context):
            return super()._postprocess(hidden_states=hidden_states, labels=labels,
                                        mtp_in_postprocess=mtp_in_postprocess, inference_context=inference_context,
                                        **kwargs)
        weight = self.shared_embedding_or_output_weight() if self.share_embeddings_and_output_weights \
            else self.output_layer.weight
        return self.output_loss(hidden_states, weight, labels, self.output_layer.tp_group)


def cpu_shims() -> None:
    """Route Megatron's CUDA-only calls to the CPU. A no-op when CUDA exists."""
    if "cpu_shims" in _applied or torch.cuda.is_available():
        return
    from megatron.core import parallel_state
    from megatron.core.models.common.embeddings import rope_utils, rotary_pos_embedding

    torch.cuda.current_device = lambda: torch.device("cpu")
    torch.cuda.synchronize = lambda *args, **kwargs: None

    def get_pos_emb_on_this_cp_rank(pos_emb, seq_dim, cp_group=None):
        # Megatron's version builds a pinned CUDA index; same zigzag slice, on the tensor's device.
        cp_size = cp_group.size() if cp_group is not None else parallel_state.get_context_parallel_world_size()
        cp_rank = cp_group.rank() if cp_group is not None else parallel_state.get_context_parallel_rank()
        idx = torch.tensor([cp_rank, 2 * cp_size - cp_rank - 1], device=pos_emb.device)
        pos_emb = pos_emb.view(*pos_emb.shape[:seq_dim], 2 * cp_size, -1, *pos_emb.shape[seq_dim + 1:])
        pos_emb = pos_emb.index_select(seq_dim, idx)
        return pos_emb.view(*pos_emb.shape[:seq_dim], -1, *pos_emb.shape[seq_dim + 2:])

    for mod in (rope_utils, rotary_pos_embedding):
        if hasattr(mod, "get_pos_emb_on_this_cp_rank"):
            mod.get_pos_emb_on_this_cp_rank = get_pos_emb_on_this_cp_rank
    _applied.add("cpu_shims")


def distrib_optimizer_load_fix() -> None:
    """Load only the optimizer-state keys a checkpoint holds (see the module docstring)."""
    if "distrib_optimizer_load_fix" in _applied:
        return
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    original = DistributedOptimizer._set_main_param_and_optimizer_states

    def _set_main_param_and_optimizer_states(self, model_param, tensors):
        if self.config.use_precision_aware_optimizer_no_fp8_or_ds_fp8:
            return original(self, model_param, tensors)
        group_index, group_order = self.model_param_group_index_map[model_param]
        main_param = self.optimizer.param_groups[group_index]["params"][group_order]
        dst = {"param": main_param, **self.optimizer.state[main_param]}
        for key, src in tensors.items():
            dst[key].copy_(src)

    DistributedOptimizer._set_main_param_and_optimizer_states = _set_main_param_and_optimizer_states
    _applied.add("distrib_optimizer_load_fix")


def init_optimizer_state(optimizer) -> None:
    """Give a fresh Megatron optimizer's Adam its (zero) state, ``step`` included, so a checkpoint loads into it."""
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        inner = opt.optimizer
        for group in inner.param_groups:
            for p in group["params"]:
                if len(inner.state[p]) == 0:
                    inner.state[p]["exp_avg"] = torch.zeros_like(p.data)
                    inner.state[p]["exp_avg_sq"] = torch.zeros_like(p.data)
                if "step" not in inner.state[p]:
                    inner.state[p]["step"] = torch.tensor(0.0)


def shield_checkpoint_writer() -> None:
    """Start Megatron's checkpoint-writer helper process now, deaf to the stop signals and dying with this rank
    (see the module docstring)."""
    try:
        from megatron.core.dist_checkpointing.strategies import filesystem_async as fa
    except ImportError:
        return
    if getattr(fa, "_results_queue", None) is not None or not hasattr(fa, "_get_write_results_queue"):
        return
    from phsa_train.training.lifetime import die_with_parent

    manager = SyncManager(ctx=multiprocessing.get_context("spawn"))  # what fa._get_write_results_queue() starts
    previous = {sig: signal.signal(sig, signal.SIG_IGN) for sig in (signal.SIGUSR1, signal.SIGTERM, signal.SIGINT)}
    try:
        manager.start(initializer=die_with_parent, initargs=(os.getpid(),))
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    fa._results_queue = manager.Queue()  # the proxy keeps the manager (and so its process) alive
