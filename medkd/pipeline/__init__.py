"""How a DVC stage runs: the papermill runner, process lifetime, output paths, a stage's context."""
