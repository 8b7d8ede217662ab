"""Pallas kernels for TPU (Mosaic) and GPU (Triton); importable with jax alone (docs/kernels.md).

* ``dequant_matmul``: ``x @ W`` for uniform b-bit codes (lqx's ``QArray`` layout).
* ``lut_matmul``: ``x @ W`` for codebook codes (lqx's ``Codebook`` layout).
* ``unpack``: in-kernel unpacking of codes packed along K into uint32 words.
* ``aot``: ahead-of-time compile for real TPU and GPU chips on a CPU machine.

Each kernel file holds the kernel bodies, a jitted public op (static ``BlockSizes``,
``backend=``, ``interpret=``) and a pure-jnp ``*_reference`` of the same signature.
"""
