"""Data: shard format, chat templates, the toy world, and the Grain input pipeline.

Submodules are imported where they are used, so `import omnijax.data.tasks` (the config does)
stays free of grain, tokenizers and tensorflow_datasets.
"""
