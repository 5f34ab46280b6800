"""Serving stage: an Open Inference Protocol v2 endpoint over the exported model package. Imports
neither ``training`` nor ``export``: a serving image needs only the package files."""
