"""Research studies built on the library (not imported by ``lqx``).

``lqx.studies.mup_transfer``: lr and weight-decay transfer across width under width-scaled
AdamW; ``lqx.studies.synthetic``: its teacher-student residual MLP.
"""
