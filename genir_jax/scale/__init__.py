"""Meshes and machines: the partitioner, multi-process start-up, host memory, the compilation cache."""
