"""Megatron-Core integration of PHSA: core-attention modules, layer specs, context parallelism."""
from phsa_train.megatron.core_attention import DenseCoreAttention, PHSACoreAttention, PHSASettings, set_sparsity
from phsa_train.megatron.specs import get_dense_layer_spec, get_phsa_layer_spec, layer_spec_from_config
from phsa_train.megatron.token_info import make_token_info

__all__ = ["DenseCoreAttention", "PHSACoreAttention", "PHSASettings", "get_dense_layer_spec",
           "get_phsa_layer_spec", "layer_spec_from_config", "make_token_info", "set_sparsity"]
