"""The universal network: modules injected into nnU-Net's planned U-Net (DESIGN §5).

* ``harmony``: HarmonyNorm / HarmonyRestore (U-Harmony Eq. 1-3) as memory-lean autograd functions.
* ``injection``: swapping the planned network's InstanceNorms for HarmonyNorm.
* ``prompts``: modality prompt (MedUniSeg MMap) and task prompt (UniSeg FUSE); availability from the input.
* ``gating``: domain gate + prototypes (DDP-synchronized) and routing.
* ``heads``: per-domain heads and their mixture into the union label space.
* ``universal_unet``: UniversalUNet, TrainOutput, build_universal_network.

Nothing is imported here: import the submodules.
"""
