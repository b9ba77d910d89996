"""Helpers for training grng optimizers inside frameworks' training loops.

* :mod:`grng.integrations.huggingface` — ``GRNGTrainer``, a ``transformers.Trainer``
  that runs ``RENG(hvp="exact")`` (it back-propagates with the gradient's graph),
  refuses ``RENG(hvp="finite_difference")`` (Trainer passes no closure) and hands an
  fp16 ``GradScaler`` to every grng optimizer. KFAC, RING and RKalman also train in
  a plain ``Trainer``.
* :mod:`grng.integrations.lightning` — ``GRNGMixin``, mixed into a
  ``LightningModule``: the same for Lightning's automatic optimization, with the
  precision plugin's loss scaling respected.

Each module imports its framework when it is imported (and raises ImportError naming
the pip package when the framework is missing); ``import grng`` imports neither.
"""
