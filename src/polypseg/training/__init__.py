"""Training: one model on one split, its losses, and evaluation on held-out data.

Modules: ``loop`` (the resumable training loop), ``distributed`` (a process's rank and device under
``torchrun``), ``state`` (what a run keeps between epochs: its ``TrainingState`` and
``BestCheckpoint``), ``progress`` (the progress bar or log lines), ``losses`` (registry over smp's
losses), ``evaluation`` (batched prediction and metrics against masks), ``train_split`` (``polypseg
train``: one train/validation/test split), ``init_source`` (the model ``--init`` starts from),
``adapt`` (the ``adapt`` recipe sized to a data set).
"""
