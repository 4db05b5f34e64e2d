"""The quantizer: static PTQ of a float ONNX model into a standard QDQ model (the QANN).

Modules, bottom to top (each imports only those above it in this list, plus the ground floor and
the runtime): config (QuantConfig, the one option list), weights (blocks, the weight grid),
rotate (rotation/smoothing math), calibration (sessions, text, observers), prefix (the outlier
prefix, calibration feeds), ranges (activation quantizers, range search), gptq, qdq (writing the
QDQ graph), transforms (rotation/smoothing/online Hadamard before calibration), full (the
--full twin), quantize (``quantize_model``, ``quantize_cli``).
"""
