"""The folder ``nnUNet_extTrainer`` points to: re-export shims only (see ``trainers/discovery.py``)."""
