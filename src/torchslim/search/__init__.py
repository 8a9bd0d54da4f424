"""``torchslim auto``: search compression plans by measured trials and return the Pareto front.

One concept per module: `config` (the recipe's ``search:`` section), `space` (the decisions: per-group
pruning ratios, precision, float layers, ranks, recovery epochs), `sensitivity` (the proxy pass, no training),
`allocation` (first plans per budget from the proxy), `trial` (one full evaluation through the registered
steps), `study` (Optuna and its storage), `worker` (the trial loop, local and remote workers), `front` (Pareto
front, choice, hypervolume, proxy rank correlation), `results` (the output folder) and `run` (`auto`).

Importing this package imports no optuna; a search does.
"""

from torchslim.search.config import ConstraintsConfig, SearchConfig, SensitivityConfig, SpaceConfig
from torchslim.search.run import auto

__all__ = ["ConstraintsConfig", "SearchConfig", "SensitivityConfig", "SpaceConfig", "auto"]
