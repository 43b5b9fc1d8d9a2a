"""From a student to a deployed file: ONNX export through optimum, the latency/memory budget planner, and
onnxruntime benchmarks with regression gates."""
