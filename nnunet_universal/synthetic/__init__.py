"""Synthetic datasets in the native layouts of the public sources (``nnunet-universal synth``; see ``api.synthesize``).

Brain MR from the MNI152 2009 template shipped in nilearn (deformed per subject, per-institution contrast, bias,
noise, resolution, skull stripping, lesions with sub-regions) and an abdominal CT phantom in HU for LiTS.
"""
