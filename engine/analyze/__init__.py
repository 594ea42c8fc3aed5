"""Analyses of continual-pretraining runs from the literature: the critical mixture ratio of a
replay sweep (`cmr`, Gu et al. 2024), the CPT loss law over the LR schedule (`loss_law`, Wang
et al. 2025, on Tissue et al. 2024's LR areas) and the stability gap (`stability`, Guo et al.
2024). The math modules (`fit`, `cmr`, `loss_law`, `stability`) are pure functions on tensors;
`runs` reads TensorBoard events, recipes and checkpoints; `plots` draws PNGs; `cli` is
`engine analyze`. Nothing here imports megatron or torch.distributed."""
