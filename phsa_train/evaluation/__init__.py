"""Evaluation of checkpoints: perplexity, attention recall, synthetic retrieval, selection statistics."""
