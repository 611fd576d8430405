"""The stage side: one module per DVC stage (its notebook imports only that module and `common`).

prepare -> stages.prepare, teacher -> stages.teacher, distill -> stages.distill,
optuna -> stages.tune, report -> stages.results. Kept empty so that importing one stage does
not import the others (dvc.yaml lists exactly the modules each stage reaches).
"""
