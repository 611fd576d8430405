"""What exists, by name: the backbone specs (where their weights come from) and the data-set specs
(folders, tasks, fields, split loaders, synthetic look-alikes). Free of torch, so that checking
params.yaml names against them costs no deep-learning import.
"""
