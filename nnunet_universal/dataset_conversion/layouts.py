"""The native layouts the converters read, as plain data (no heavy imports: ``convert --help`` shows them)."""

from __future__ import annotations

#: Native layout each converter reads, in one line (error messages and ``convert --help``).
LAYOUTS: dict[str, str] = {
    "brats-*": "BraTS-XXX-NNNNN-TTT/BraTS-XXX-NNNNN-TTT-{t1n,t1c,t2w,t2f,seg}.nii.gz case folders",
    "ucsf-bmsr": "UCSF-BMSR/UCSF_BrainMetastases_TRAIN/<exam>/<exam>_{T1pre,T1post,FLAIR,subtraction,seg}.nii.gz",
    "brainmetshare": "stanford_release_brainmask/mets_stanford_releaseMask_train/Mets_NNN/{0,1,2,3,seg}/<k>.png "
                     "(or the NIfTI re-release train/Mets_NNN/{bravo,t1_pre,t1_gd,flair,seg}.nii.gz)",
    "lits": "volume-N.nii + segmentation-N.nii (in one folder or in sub-folders)",
    "msd": "TaskNN_Name/{dataset.json,imagesTr/,labelsTr/} as downloaded from the Decathlon",
    "nnunet": "DatasetNNN_Name/{dataset.json,imagesTr/,labelsTr/} (nnU-Net v2 raw)",
}


def expected_layout(source: str) -> str:
    """The native layout the converter of ``source`` reads (``brats-*`` share one)."""
    key = "brats-*" if source.startswith("brats-") else "msd" if source.startswith("msd") else source
    return LAYOUTS.get(key, "the layout of the dataset as downloaded")


#: Per-case spacing of BrainMetShare PNG cases, next to the case folders (``synth`` writes it, ``convert`` reads
#: it when ``--spacing`` is not given): ``{"spacing_mm": {"Mets_005": [x, y, z], ...}}``.
SPACING_FILE = "spacing_mm.json"
