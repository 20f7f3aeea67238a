"""Runnable, tested examples and the models they use (``examples.models``)."""
