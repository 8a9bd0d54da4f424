"""torchslim: make any PyTorch model smaller and faster, recover its accuracy, and prove it with measured numbers.

Public API (everything else is internal):

    >>> import torchslim
    >>> recipe = torchslim.load_recipe("examples/recipes/demo.yaml")
    >>> report = torchslim.compress(recipe, "out/demo")
    >>> report["stages"][-1]["ratios"]["speedup_batch"]

    >>> result = torchslim.apply(model, torchslim.Int8StaticConfig(), calibration_loader)
    >>> result.save("out/int8")
    >>> model_int8 = torchslim.load("out/int8", MyNet())

Importing torchslim loads torch but none of the optional heavy packages (transformers, onnxruntime, timm,
torchvision); those load when a spec or a runtime needs them.
"""

from __future__ import annotations

import importlib

from torchslim._version import __version__

# name -> module that defines it; resolved on first access to keep `import torchslim` light.
_PUBLIC = {
    "InputError": "torchslim.errors",
    "RecipeError": "torchslim.errors",
    "Recipe": "torchslim.recipe",
    "MeasureConfig": "torchslim.recipe",
    "load_recipe": "torchslim.recipe",
    "parse_recipe": "torchslim.recipe",
    "compress": "torchslim.pipeline",
    "apply": "torchslim.api",
    "ApplyResult": "torchslim.api",
    "load": "torchslim.loading",
    "auto": "torchslim.search",
    "SearchConfig": "torchslim.search.config",
    "SpaceConfig": "torchslim.search.config",
    "ConstraintsConfig": "torchslim.search.config",
    "SensitivityConfig": "torchslim.search.config",
    "profile_model": "torchslim.profile",
    "register_method": "torchslim.registry",
    "list_methods": "torchslim.registry",
    "list_method_details": "torchslim.catalog",
    "list_spec_details": "torchslim.catalog",
    "recipe_schema": "torchslim.schema",
    "ModelBundle": "torchslim.zoo",
    "resolve_model": "torchslim.zoo",
    "register_model_prefix": "torchslim.zoo",
    "list_builtin_models": "torchslim.zoo",
    "DataBundle": "torchslim.data",
    "resolve_data": "torchslim.data",
    "register_data_prefix": "torchslim.data",
    "list_builtin_data": "torchslim.data",
    "DataConfig": "torchslim.data.config",
    "SplitConfig": "torchslim.data.config",
    "CalibrationConfig": "torchslim.data.config",
    "ModelConfig": "torchslim.zoo.config",
    "ExportConfig": "torchslim.export.config",
    "write_exports": "torchslim.export",
    "load_plugins": "torchslim.plugins",
    "MagnitudePruningConfig": "torchslim.pruning.magnitude",
    "ChannelPruningConfig": "torchslim.pruning.channel",
    "PruneResult": "torchslim.pruning.channel",
    "prune": "torchslim.pruning.channel",
    "save_pruned": "torchslim.pruning.channel",
    "FinetuneConfig": "torchslim.recover.finetune",
    "DistillConfig": "torchslim.recover.finetune",
    "LossConfig": "torchslim.recover.finetune",
    "Trainer": "torchslim.recover.trainer",
    "TrainConfig": "torchslim.recover.trainer",
    "TrainResult": "torchslim.recover.trainer",
    "EarlyStopConfig": "torchslim.recover.trainer",
    "OptimizerConfig": "torchslim.recover.optim",
    "ScheduleConfig": "torchslim.recover.optim",
    "ParamGroupConfig": "torchslim.recover.optim",
    "register_loss": "torchslim.recover.losses",
    "list_losses": "torchslim.recover.losses",
    "Int8StaticConfig": "torchslim.quant.int8_static",
    "AdaRoundConfig": "torchslim.quant.adaround",
    "Int8DynamicConfig": "torchslim.quant.int8_dynamic",
    "QatConfig": "torchslim.quant.qat",
    "Bf16Config": "torchslim.quant.bf16",
    "AutoPrecisionConfig": "torchslim.quant.choose",
    "RowwiseInt8Config": "torchslim.compact.embeddings",
    "RowwiseInt4Config": "torchslim.compact.embeddings",
    "HashingConfig": "torchslim.compact.embeddings",
    "QuotientRemainderConfig": "torchslim.compact.embeddings",
    "MixedDimensionConfig": "torchslim.compact.embeddings",
    "SvdConfig": "torchslim.factorize.svd",
    "FactorizeResult": "torchslim.factorize.svd",
    "factorize_svd": "torchslim.factorize.svd",
    "MaterializeConfig": "torchslim.compact.materialize",
    "WeightSharingConfig": "torchslim.compact.codebook",
    "CompactDeployable": "torchslim.compact.artifact",
    "read_artifact": "torchslim.compact.artifact",
    "materialize_": "torchslim.compact.materialize",
    "Int4WeightConfig": "torchslim.quant.weight_only_step",
    "Int8WeightConfig": "torchslim.quant.weight_only_step",
    "WandaConfig": "torchslim.pruning.oneshot",
    "SparseGPTConfig": "torchslim.pruning.oneshot",
    "count_params": "torchslim.measure",
    "count_nonzero_params": "torchslim.measure",
    "count_macs": "torchslim.measure",
    "artifact_bytes": "torchslim.measure",
    "measure_latency": "torchslim.measure",
    "peak_memory_bytes": "torchslim.measure",
}

# Old names, kept for one release with a DeprecationWarning: name -> (module, name there now, what to use).
_DEPRECATED = {
    "MagnitudePruning": ("torchslim.pruning.magnitude", "MagnitudePruningConfig"),
    "ChannelPruning": ("torchslim.pruning.channel", "ChannelPruningConfig"),
    "WandaPruning": ("torchslim.pruning.oneshot", "WandaConfig"),
    "SparseGPTPruning": ("torchslim.pruning.oneshot", "SparseGPTConfig"),
    "SvdFactorization": ("torchslim.factorize.svd", "SvdConfig"),
    "WeightSharing": ("torchslim.compact.codebook", "WeightSharingConfig"),
    "Materialize": ("torchslim.compact.materialize", "MaterializeConfig"),
    "Int8Static": ("torchslim.quant.int8_static", "Int8StaticConfig"),
    "Int4Weight": ("torchslim.quant.weight_only_step", "Int4WeightConfig"),
    "Int8Weight": ("torchslim.quant.weight_only_step", "Int8WeightConfig"),
    "load_pruned": ("torchslim.pruning.channel", "_load_pruned"),
    "load_factorized": ("torchslim.factorize.svd", "_load_factorized"),
    "load_compact": ("torchslim.compact.artifact", "_load_compact"),
    "load_weight_only": ("torchslim.quant.weight_only_step", "_load_weight_only"),
}

__all__ = sorted(_PUBLIC) + ["__version__"]


def __getattr__(name: str):
    if name in _PUBLIC:
        value = getattr(importlib.import_module(_PUBLIC[name]), name)
        globals()[name] = value
        return value
    if name in _DEPRECATED:
        import warnings

        module, current = _DEPRECATED[name]
        instead = "torchslim.load(path, model)" if current.startswith("_") else f"torchslim.{current}"
        warnings.warn(f"torchslim.{name} is deprecated and will be removed in torchslim 0.2; use {instead}",
                      DeprecationWarning, stacklevel=2)
        return getattr(importlib.import_module(module), current)
    raise AttributeError(f"module 'torchslim' has no attribute {name!r}")


def __dir__() -> list[str]:
    return __all__
