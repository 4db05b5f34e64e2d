"""Compiler: CLI, model I/O, quantizer, exporter and the pass pipeline."""
