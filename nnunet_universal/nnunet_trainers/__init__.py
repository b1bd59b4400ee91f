"""The folder ``nnUNet_extTrainer`` points to: re-export shims only (see ``nnunet_universal/discovery.py``)."""
