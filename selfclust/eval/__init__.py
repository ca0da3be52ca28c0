"""Evaluation: metrics, scoring, `selfclust evaluate`, probes, k-NN, pictures."""
