"""Re-exports for nnU-Net's trainer lookup (``nnUNet_extTrainer``); the classes live in nnunet_universal.trainers."""

from nnunet_universal.trainers.extension_trainer import (  # noqa: F401
    UniversalTrainer_Extend,
    UniversalTrainer_ExtendNewParts,
    UniversalTrainer_ExtendNewPartsHarmony,
    UniversalTrainer_ExtendNoOldData,
    UniversalTrainer_ExtendNoOldDataAll,
)
from nnunet_universal.trainers.scheduled import nnUNetTrainerScheduled  # noqa: F401
from nnunet_universal.trainers.universal_trainer import UniversalTrainer  # noqa: F401
from nnunet_universal.trainers.variants import (  # noqa: F401
    UniversalTrainer_FirstStageHarmony,
    UniversalTrainer_FullRateHarmony,
    UniversalTrainer_MarginalJoint,
    UniversalTrainer_NaiveJoint,
    UniversalTrainer_NoGate,
    UniversalTrainer_NoHarmony,
    UniversalTrainer_NoModalityDropout,
    UniversalTrainer_NoPolyAffine,
    UniversalTrainer_NoRestore,
    UniversalTrainer_Prompts,
)
