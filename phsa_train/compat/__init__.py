"""Every work-around for another library, one module per library and version, applied from here only.

Each module has a version guard, names the upstream behaviour it corrects, and offers ``apply()``.
:func:`phsa_train.training.distributed.prepare_device` calls :func:`apply` once per process, before a model
is built. Two are applied where they are needed: ``shield_checkpoint_writer`` starts a helper process, so only
the training loop's ``PreemptionWatcher`` calls it (evaluation and conversion never get preemption signals);
``provide_fused_rope`` is installed by the model builder when the fused kernels are on.
"""
from phsa_train.compat import megatron_core_0_16_1


def apply(on_gpu: bool) -> None:
    megatron_core_0_16_1.apply(on_gpu)


__all__ = ["apply", "megatron_core_0_16_1"]
