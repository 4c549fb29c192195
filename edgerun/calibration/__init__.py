"""INT8 calibration: data sources, explicit Q/DQ, sensitivity and accuracy reports (see DESIGN.md).

`edgerun.calibration.pipeline.calibrate(bundle, data, output, CalibrationOptions(...))` is the entry
point (`edge-run calibrate`). The parts, in the order a run uses them:
  sources.py      calibration and held-out images: a folder, a .txt list, a video, a camera
  nodes.py        which linear layers get INT8 and which stay float, and why
  collect.py      runs the float bundle with augmented graphs, folding activations into statistics
  stats.py        streaming histograms; MinMax, Entropy (KL), Percentile and auto (least error) ranges
  sensitivity.py  the error each layer alone adds
  qdq.py          Q/DQ insertion: symmetric S8 for TensorRT, U8S8 for onnxruntime on CPU
  decoder.py      dynamic INT8 weights for decoders on CPU, and the rewrite both decoder schemes share
  blockwise.py    block-wise INT8 decoder weights (onnxruntime's MatMulNBits), the default on x86-64
  fp16.py         FP16 GPU variants
  build.py        variant files and their manifest entries
  accuracy.py     held-out comparison with the float twin
  taskeval.py     --eval data files: recall, VQA accuracy, caption BLEU/CIDEr-D against the float twin's
  trtcache.py     TensorRT calibration cache from the same statistics
Nothing here imports torch; onnx is needed (pip install 'edge-run[calibrate]').
"""
