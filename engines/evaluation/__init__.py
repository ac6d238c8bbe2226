"""Evaluation: restoration metrics (CSBDeep convention) and the classical baselines."""
