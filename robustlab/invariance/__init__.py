"""Invariance-based adversarial examples: generation, human labels and the leakage guard."""
