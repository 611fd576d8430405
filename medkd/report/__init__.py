"""The report, by job: `data` (the data report of stage `prepare`), `tables` (the study's tables),
`figures` (its figures), `page` (results.md), `plots` (what the figures share). This file imports
none of them, so a stage loads only the jobs it runs (and dvc.yaml lists only those)."""
