"""The thesis experiment: regimes × seeds (× folds) as child runs on the launcher, and its report."""
