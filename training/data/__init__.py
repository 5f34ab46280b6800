"""The dataset folder format, its validator, importers, synthetic generator and augmentations."""
