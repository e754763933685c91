"""Using a trained run: loading it, predicting, output writers, videos, export and ONNX models."""
