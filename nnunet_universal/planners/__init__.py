"""Planning for merged datasets: availability-aware fingerprint, UniversalPlanner (+ ResEnc presets), plans block.

Modules: ``fingerprint`` (UniversalFingerprintExtractor), ``planner`` (UniversalPlanner, PRESETS),
``plans_block`` (ensure_universal_plans), ``api`` (plan_and_preprocess, behind ``nnunet-universal plan``).
Nothing is imported here so that importing the package stays cheap.
"""
