"""Distributed training modes beyond plain data parallelism (Accelerate + DeepSpeed handle data parallelism).

`expert_parallel`: shard the routed experts of MoE models across ranks; tokens travel by all-to-all.
"""
