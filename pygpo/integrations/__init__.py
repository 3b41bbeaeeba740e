"""Integrations of pygpo with other libraries; each submodule imports its library lazily.

* :mod:`pygpo.integrations.transformers`: prefix-sharing attention for Hugging Face models
  (``enable_prefix_sharing``, ``disable_prefix_sharing``, ``response_logprobs``).
* :mod:`pygpo.integrations.hidden_states`: final hidden states without logits and the lm_head weight
  (tied, DDP, FSDP2) for the fused ops (``final_hidden_states``, ``lm_head_of``, ``LMHead``).
* :mod:`pygpo.integrations.trl`: ``FusedDPOTrainer``, TRL's ``DPOTrainer`` with its loss step fused
  (TRL's loss types and options mapped to the registry, prefix sharing optional).
* :mod:`pygpo.integrations.trl_kto`: ``FusedKTOTrainer``, TRL's ``KTOTrainer`` with its loss step fused
  (``kto`` / ``apo_zero_unpaired``, TRL's gathered KL reference point, precomputed reference scores).
* :mod:`pygpo.integrations.trl_cpo` / :mod:`pygpo.integrations.trl_orpo`: ``FusedCPOTrainer`` / ``FusedORPOTrainer``,
  TRL's experimental ``CPOTrainer`` / ``ORPOTrainer`` with their loss steps fused (sigmoid / hinge / ipo / simpo /
  AlphaPO mapped to ``cpo``, ``hinge``, ``ipo``, ``simpo``, ``alphapo`` plus ``sft``; ORPO's prompt-inclusive NLL
  exact); :mod:`pygpo.integrations.trl_common`: what the fused TRL trainers share.
* :mod:`pygpo.integrations.liger`: Liger-Kernel-compatible fused losses (``LigerFusedLinearDPOLoss``,
  ``...ORPOLoss``, ``...CPOLoss``, ``...SimPOLoss``, ``...KTOLoss``, ``liger_fused_linear_*``).
"""
