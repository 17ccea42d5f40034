"""Adversarial attacks: ART attacks by name (`registry`) for evaluation, TF-graph PGD/FGSM/TRADES
attacks (`tf_attacks`) for training and validation."""

from robustlab.attacks.art_factory import make_classifier
from robustlab.attacks.registry import ATTACK_NAMES, make_attack
from robustlab.attacks.tf_attacks import PerturbFn, make_perturb_fn, pgd_attack

__all__ = [
    "ATTACK_NAMES",
    "PerturbFn",
    "make_attack",
    "make_classifier",
    "make_perturb_fn",
    "pgd_attack",
]
