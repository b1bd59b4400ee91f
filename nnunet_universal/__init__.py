"""nnunet-universal: one nnU-Net v2 model from many heterogeneous, partially labelled datasets."""

__version__ = "0.1.0"
