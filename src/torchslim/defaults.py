"""The embedded default job that ``torchslim demo`` runs (also shipped as examples/recipes/demo.yaml)."""

DEMO_RECIPE = """\
# torchslim demo: a residual CNN on scikit-learn's digits loses half of its channels (structured pruning),
# wins its accuracy back by distillation from the original, and is quantized to int8 (bias correction off:
# on this small model it moved one of the 539 test digits the wrong way).
model: builtin:digits-cnn
data: builtin:digits
steps:
  - prune: {method: channel, ratio: 0.5, scope: local, importance: l1, round_to: 8}
  - finetune: {epochs: 12, batch_size: 64, optimizer: {name: sgd, lr: 0.02}, distill: {temperature: 4.0, alpha: 0.7}}
  - quantize: {method: int8-static, runtime: auto, observer: minmax, per_channel: true, bias_correction: false}
measure: {batch_size: 256}
"""
