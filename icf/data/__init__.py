"""AVSBench adapters, the synthetic generator, the Sample schema and the trainer's shard reader."""
