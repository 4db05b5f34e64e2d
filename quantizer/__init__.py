"""The quantizer: static PTQ of a float ONNX model into a standard QDQ model (the QANN)."""
