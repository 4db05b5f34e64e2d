"""Runtime: the kernels of the ai.ttfsc ops (lowerings to onnxruntime's own ops), sessions, generation.

The ops themselves (schemas, specs, the TTFSNeuron's description) are the ground floor's
``ttfsc.dialect`` and ``ttfsc.neuron``; the runtime imports only the ground floor.

The one documented call: ``ttfsc.runtime.open_session(path)``.
"""
from ttfsc.runtime.session import open_session

__all__ = ["open_session"]
