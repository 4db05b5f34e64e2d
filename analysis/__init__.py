"""Analysis: evaluation (perplexity, zero-shot tasks, lm-eval backend), report, energy and sweeps."""
