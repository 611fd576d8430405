"""The study's report, by job: `data_report` (stage prepare's data report), `tables` (the study's
tables), `figures` (its figures, the search's included), `page` (results.md), `plots` (what the figures
share). Imports none of them, so a stage loads only the jobs it runs (and dvc.yaml lists only those)."""
