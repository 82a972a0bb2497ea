"""Jobs, the run folder and the executor of shard tasks on Ray."""
