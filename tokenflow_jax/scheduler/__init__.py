"""Scheduling policies (tokenflow and baselines) and the contract they share with executors."""
