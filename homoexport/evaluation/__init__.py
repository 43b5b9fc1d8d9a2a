"""Accuracy: GLUE data and metrics, fine-tuning, and scoring in PyTorch, ONNX fp32 and ONNX int8."""
