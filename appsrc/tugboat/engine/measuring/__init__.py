"""Numbers about a model: size, paired latency, quality, per-layer tables, the runtimes a model is
measured in, diagnosis, the memory check and export targets.
"""
