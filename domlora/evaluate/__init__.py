"""Evaluation: lm-eval tasks and MT-Bench on a base model or base + adapter (`run.evaluate`)."""
