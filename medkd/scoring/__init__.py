"""How a run is scored: macro-F1 and accuracy, per-image prediction files, bootstrap intervals."""
