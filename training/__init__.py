"""scaleseg training: data, models, semi-supervised methods, the shared loop and evaluation."""
__version__ = "0.1.0"
