"""RETRO models on top of retro_kernels: retrieval database, model, training, evaluation.

Run ``python -m models --help`` for the command-line tools.
"""
