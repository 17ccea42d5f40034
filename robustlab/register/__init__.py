"""`register`: choose the best robust model on validation data, register it, evaluate it on test data."""
