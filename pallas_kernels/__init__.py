"""Pallas kernels (fused dequant-matmul for GPU and TPU). Each file: *_kernel, a jitted public op, a pure-jnp *_reference."""
