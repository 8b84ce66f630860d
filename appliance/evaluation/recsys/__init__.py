"""Offline recommender evaluation: the leave-last-out split, the metrics and the baselines.

Used by `appliance eval ranking` (appliance/evaluation/ranking.py). Evaluation-only dependencies
(`scipy`, `implicit`) live in the `eval` extra; the box never imports this package.
"""
