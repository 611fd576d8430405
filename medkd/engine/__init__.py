"""Training: the loss terms, the trunk and teacher caches, the loop (teacher and distillation),
evaluation, the linear probe. Imports none of its modules (each is imported by name)."""
