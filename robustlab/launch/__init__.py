"""The launcher: child runs on an Optuna study (storage, parent run, workers, retries, adoption)."""
