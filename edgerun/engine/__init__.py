"""TensorRT engines from a bundle's ONNX, written into the bundle: `edge-run engine build`.

  build.py     plan (which ONNX variant, precision, profiles) and build each module's engine
  calibrator.py  legacy implicit INT8 calibration from a TensorRT calibration cache (8.x, 10.x)
  write.py     engine files and their manifest entries, written atomically into the bundle

Imports no torch (nor onnx): Jetson boards build engines on the device from the bundle alone.
"""
