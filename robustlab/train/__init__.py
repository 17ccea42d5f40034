"""The one training loop, its batch mixture, checkpoints and the regime runner."""
