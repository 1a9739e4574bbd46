"""phsa_train: LLM pretraining on Megatron-Core with PHSA (punctuation-aware hybrid sparse attention)."""
import warnings

# Megatron-Core warns at import that optional CUDA extensions (Apex, Transformer Engine) are absent; the
# local fallbacks are what this stack uses on purpose, so the warnings are noise on every start.
warnings.filterwarnings("ignore", message=r".*(Transformer Engine and Apex|Apex is not installed|full scope is deprecated).*")

__version__ = "0.1.0"
