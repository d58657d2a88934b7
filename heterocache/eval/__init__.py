"""Evaluation: tasks, metrics, resumable runner, reports."""
