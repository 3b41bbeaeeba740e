"""Integrations of pygpo with other libraries; each submodule imports its library lazily.

* :mod:`pygpo.integrations.transformers`: prefix-sharing attention for Hugging Face models
  (``enable_prefix_sharing``, ``disable_prefix_sharing``, ``response_logprobs``).
* :mod:`pygpo.integrations.liger`: Liger-Kernel-compatible fused losses (``LigerFusedLinearDPOLoss``,
  ``...ORPOLoss``, ``...CPOLoss``, ``...SimPOLoss``, ``...KTOLoss``, ``liger_fused_linear_*``).
"""
