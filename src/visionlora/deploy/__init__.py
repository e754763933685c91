"""Using a trained run: loading it, predicting, output writers, videos, export and ONNX models."""

MAX_METRIC_DROP = 0.01  # the largest fall of the main metric an int8 export may have, by default
