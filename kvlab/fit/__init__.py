"""Fitting what methods learn: distillation training (``train``), budget and rank search (``search``), and
fine-tuning under a compressed cache (``finetune``)."""
