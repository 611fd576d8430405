"""Deployment: a trained model as an ONNX folder, its latency, and `medkd predict`. Needs no training
code: checkpoints are read with `medkd.models.checkpoint`."""
