"""Largest U-Harmony parameters of trained checkpoints (the diagnosis behind UniversalTrainer's harmony_lr_scale 0.1).

    python scripts/inspect_harmony.py RESULTS_FOLDER/.../fold_0/checkpoint_final.pth [...]

Per checkpoint: the largest |Hermite coefficient| of any HarmonyNorm (``*.poly_weight``) and the largest
|restoration mix| of any HarmonyRestore (``restores.*.mix``); at initialization both are 0 (InstanceNorm, identity).
"""

from __future__ import annotations

import sys


def harmony_extremes(path: str) -> dict[str, float]:
    """{'poly_weight': max |.|, 'restore_mix': max |.|} of the network weights in one nnU-Net checkpoint."""
    from nnunet_universal.inference.checkpoints import load_checkpoint

    weights = load_checkpoint(path)["network_weights"]  # weights only, nnU-Net's allow-list: no code from the file
    out = {}
    for name, suffix in (("poly_weight", ".poly_weight"), ("restore_mix", ".mix")):
        values = [v.abs().max().item() for k, v in weights.items() if k.endswith(suffix) and v.numel()]
        out[name] = max(values) if values else float("nan")
    return out


def main() -> int:
    if len(sys.argv) < 2:
        print(__doc__)
        return 2
    for path in sys.argv[1:]:
        ext = harmony_extremes(path)
        print(f"{path}: max |Hermite coefficient| {ext['poly_weight']:.2f}, max |restoration mix| "
              f"{ext['restore_mix']:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
