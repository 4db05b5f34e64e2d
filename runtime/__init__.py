"""Runtime: TTFS op schemas, their kernels (lowerings to onnxruntime's own ops) and sessions.

The one documented call: ``ttfsc.runtime.open_session(path)``.
"""
from ttfsc.runtime.session import open_session

__all__ = ["open_session"]
