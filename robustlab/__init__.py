"""robustlab: MLflow-tracked adversarial-robustness experiments on MNIST."""

__version__ = "0.1.0"
