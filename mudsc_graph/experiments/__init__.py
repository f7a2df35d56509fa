"""Experiments on real data: tasks and training, evaluation, the demo and its model cache."""
