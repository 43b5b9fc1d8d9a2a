"""homoexport: HomoDistil task-agnostic distillation of BERT-class encoders to a measured budget,
exported to quantized ONNX and validated on GLUE."""

__version__ = "0.1.0"
