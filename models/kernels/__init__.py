"""CPU and GPU kernels: the C kernels of csrc/ (built on first use by build.py, called
through w8a16.py), the fused decode-block path (decode.py), the Triton int8 kernels, CUDA
graphs, and the int8 layers' choice among them (backends.py)."""
