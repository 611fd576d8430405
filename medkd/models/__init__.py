"""The networks: backbones (built from their specs, cut for partial fine-tuning), the multimodal
classifier, and its checkpoint format (saved, read, rebuilt without the training code)."""
