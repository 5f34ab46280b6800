"""Export stage: checkpoint -> self-describing model package (ONNX, optional CIF multi-scale graph,
TensorRT engine, Triton repository). Reads checkpoints through ``training.checkpoint``."""
