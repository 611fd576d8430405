"""One module per DVC stage, named as the stage: check, prepare, teacher, distill, search, export
(export and export-teacher), report. Kept empty so that importing one stage does not import the others
(dvc.yaml lists exactly the modules each stage reaches)."""
