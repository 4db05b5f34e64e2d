"""ttfsc: compile quantized LLMs into time-to-first-spike spiking networks (QC-A2S).

The modules directly in this package are the ground floor, importing nothing above them:
``ttfsc.ttfs`` (every TTFS formula), ``ttfsc.simulator`` (Eq. (7) stepped one time step at a
time), ``ttfsc.graph`` (the graph toolkit), ``ttfsc.modelio`` (model files), ``ttfsc.transaction``
(a command's outputs, all or nothing), ``ttfsc.errors``,
``ttfsc.dialect`` and ``ttfsc.neuron`` (the ``ai.ttfsc`` operators). Above them, arrows pointing
down only (docs/architecture.md): ``ttfsc.runtime``, then ``ttfsc.passes`` and
``ttfsc.quantizer``, then ``ttfsc.compiler``, ``ttfsc.analysis`` and the command line ``ttfsc.cli``.
"""
__version__ = "0.1.0"
