"""Evaluation every command shares: ``eval``, ``compare``, ``report``, the ladder and the demo.

- :mod:`bittune.evaluation.metrics`: accuracy, macro-F1, confusion matrix on fixed predictions (pure Python).
- :mod:`bittune.evaluation.loading`: :func:`~bittune.evaluation.loading.load_model`, the one model-loading seam.
- :mod:`bittune.evaluation.generation`: greedy replies and label ranking by likelihood.
- :mod:`bittune.evaluation.core`: :func:`~bittune.evaluation.core.evaluate_path` /
  :func:`~bittune.evaluation.core.evaluate_loaded`: token-level loss/perplexity, classifier metrics, label tasks.
- :mod:`bittune.evaluation.harness`: lm-evaluation-harness tasks on the loaded model (offline tasks in
  :mod:`bittune.evaluation.tasks`).

Importing this package imports no torch/transformers.
"""
