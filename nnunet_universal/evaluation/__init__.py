"""Evaluation in the union label space, per domain.

``metrics`` (Dice, HD95), ``lesions`` (BraTS 2023 lesion-wise scores), ``report`` (per-case scoring,
per-domain summaries, Markdown), ``plots`` (PNG), ``api`` (``nnunet-universal evaluate`` on folders).
"""
