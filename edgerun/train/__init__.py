"""Training the built-in families (`edgerun.models.families`) on image-text data.

    edge-run train tiny-vit-all --data captions.json --data questions.json --data answers.json -o runs/1
    edge-run export ckpt:runs/1/best.pt --task all -o bundle

Modules, each imported where used (this package imports nothing; `options` and `metrics` need no torch):

- `data`: COCO-style caption files and VQA-v2-style question/answer files -> examples; images
  decoded once through the runtime's own preprocessing.
- `batches`: the families' loss batches, in a seeded order that a resumed run repeats.
- `options`: `TrainOptions`.
- `metrics`: VQA accuracy, caption BLEU (sacrebleu) and CIDEr-D.
- `evaluate`: validation of a torch model (losses, greedy captions and answers, metrics).
- `state`: the resumable training state; atomic file writing.
- `loop`: `train()`.
- `easyvqa`: the easy-VQA set (PyPI `easy-vqa`) converted into the formats above.
"""
