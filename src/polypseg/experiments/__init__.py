"""Experiments that train and write run folders: cross-validation, the studies, benchmarks.

Modules: ``cv`` (k-fold cross-validation with nnU-Net's discipline), ``studies`` (external validation,
skip ablation, encoder initialisation, the PraNet protocol), ``bench`` (inference and training speed).
"""
