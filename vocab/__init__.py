"""What every package agrees on: the FACS table (`facs`), how AUs are said and recognised in text
(`phrases`), the record schema (`records`) and the shard files records live in (`shards`).

It imports nothing else of the project: models, datamodules, synthesis, training and evaluation read
it, and none of them has to reach into another for these.
"""
