"""Experiments that train and write run folders: cross-validation, the studies, benchmarks.

Modules: ``cv`` (k-fold cross-validation with nnU-Net's discipline), ``studies`` (the paired studies,
skip ablation and encoder initialisation, and the names of every study), ``external`` (external
validation), ``pranet`` (the PraNet protocol), ``study_common`` (what the studies share), ``bench``
(inference and training speed).
"""
