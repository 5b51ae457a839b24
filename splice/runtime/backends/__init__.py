"""Backends: TVM (CPU and edge), later Triton kernels and ONNX. Each imports its library lazily."""
