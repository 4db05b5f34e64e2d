"""ttfsc: compile quantized LLMs into time-to-first-spike spiking networks (QC-A2S).

Subpackages: ``ttfsc.compiler`` (CLI, pipeline, quantizer, export), ``ttfsc.passes``
(one graph rewrite per module), ``ttfsc.runtime`` (TTFS op kernels and sessions).
``ttfsc.ttfs`` is the one module holding the TTFS math; ``ttfsc.simulator`` steps Eq. (7).
"""
__version__ = "0.1.0"
