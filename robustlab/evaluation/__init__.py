"""Evaluation: accuracies with confidence intervals, robustness under attack, plots."""
