"""The embedded default job that ``torchslim demo`` runs (also shipped as examples/recipes/demo.yaml)."""

DEMO_RECIPE = """\
# torchslim demo: a residual CNN on scikit-learn's digits, pruned, recovered by distillation, quantized to int8.
model: builtin:digits-cnn
data: builtin:digits
steps:
  - prune: {method: magnitude, sparsity: 0.5, scope: global}
  - finetune: {epochs: 3, batch_size: 64, optimizer: {name: sgd, lr: 0.01}, distill: {temperature: 4.0, alpha: 0.7}}
  - quantize: {method: int8-static, runtime: auto, observer: minmax, per_channel: true}
measure: {batch_size: 256}
"""
