"""Labeling app stage: Gradio UI for prediction and the active-labeling loop with Label Studio."""
