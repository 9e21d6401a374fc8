"""CPU and GPU kernels: w8a16 (C, compiled on first use), the Triton int8 kernels, CUDA
graphs and the fused decode-block path."""
