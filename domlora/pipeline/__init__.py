"""The pipeline around the library: params.yaml profiles (`params`), artefact paths (`paths`), one
function per DVC stage (`stages`), MLflow (`tracking`), the report (`report`), stage processes
recorded in DVC (`orchestrate`) and the registry of dominant modules (`registry`)."""
