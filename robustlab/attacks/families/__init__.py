"""One module per attack family, each defining one `ATTACK` (a `robustlab.attacks.attack.Attack`):
the registry (`robustlab.attacks.registry`) collects every module here. Adding an attack is one
module here plus its test. Modules import ART and TensorFlow inside their builders only."""
