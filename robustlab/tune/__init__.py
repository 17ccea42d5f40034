"""Hyper-parameter tuning of the joint regime's batch mixture with Optuna (`robustlab tune`)."""
