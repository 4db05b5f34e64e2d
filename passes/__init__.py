"""Graph rewrite passes, one per module, each named for what it rewrites."""
