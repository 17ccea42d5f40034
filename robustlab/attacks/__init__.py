"""Adversarial attacks: ART attacks by name for evaluation, TF-graph PGD/FGSM for training."""

from robustlab.attacks.art_factory import ATTACK_NAMES, make_attack, make_classifier
from robustlab.attacks.tf_attacks import PerturbFn, make_perturb_fn, pgd_attack

__all__ = [
    "ATTACK_NAMES",
    "PerturbFn",
    "make_attack",
    "make_classifier",
    "make_perturb_fn",
    "pgd_attack",
]
