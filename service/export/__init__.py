"""Export: PyTorch → ONNX (FP32, FP16, INT8) proven against PyTorch, and artifact downloads."""
