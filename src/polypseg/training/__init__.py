"""Training: one model on one split, its losses, and evaluation on held-out data.

Modules: ``loop`` (the resumable training loop), ``losses`` (registry over smp's losses),
``evaluation`` (batched prediction and metrics against masks), ``train_split`` (``polypseg train``:
one train/validation/test split).
"""
