"""Native public datasets -> nnU-Net raw datasets with universal metadata, and their merge.

``api.convert`` (one reader module per source: brats, ucsf_bmsr, brainmetshare, lits, msd, nnunet_raw; shared
validation, atomic writing and resume in validation/writer/runner/common) and ``merge.merge_datasets`` (union
labels and slots in union.py, hold-out and folds in splits.py).
"""
