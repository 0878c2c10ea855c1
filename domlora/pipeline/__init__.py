"""The pipeline around the library: params.yaml profiles (`params`) and the grid.yaml they write (`grid`),
artefact paths (`paths`), one module per DVC stage (`stages`), the budget classes' learning rates (`tune`),
processes a stage launches (`launch`), MLflow (`tracking`), the reports (`report`, `placement_report`,
`sparse_b_report`), the registry of dominant modules (`registry`), and stages run and shared across hosts
(`orchestrate`, `remote`, `cluster`)."""
