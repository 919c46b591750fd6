"""What a compression step is and does: the technique interface and registry, pruning, quantization,
distillation, fine-tuning and the one training loop, and the pre-run estimate.
"""
