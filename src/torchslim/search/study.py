"""The study: Optuna as the search engine, its storage as the distribution layer.

- Storage: a journal file (`optuna.storages.JournalStorage`, file backend: no server; every write appended and
  flushed, so a killed search loses at most the trials in flight), or any RDB URL SQLAlchemy reaches
  (``sqlite:///...``, ``postgresql://...``, ``mysql://...``) that workers on many machines share; RDB studies
  run Optuna's heartbeat, so a dead worker's trial is failed and retried once.
- Everything a worker needs (the recipe, the space, the sensitivity result, the baseline) is a study user
  attribute (``torchslim``): `torchslim worker --storage URL --study NAME` needs nothing else.
- Objectives are minimised: the score's drop and the cost ratios to the baseline; constraints (drop minus
  ``max_drop``, target ratio minus ``budget``; <= 0 is feasible) are the trial's ``constraints`` user
  attribute and the trial's Optuna constraints (``Trial.set_constraint``), which the sampler reads.

optuna is imported here only, when a search runs (never at ``import torchslim``).
"""

from __future__ import annotations

import os
import re
import socket
import warnings
from pathlib import Path
from typing import Any

from torchslim.errors import InputError, describe

PAYLOAD = "torchslim"
PAYLOAD_SCHEMA = "torchslim.search-study/1"


def require_optuna():
    """optuna, quieted; InputError naming the extra when it is not installed."""
    try:
        import optuna
    except ImportError:
        raise InputError("torchslim auto needs optuna: pip install 'torchslim[search]'") from None
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    return optuna


def masked(url: str) -> str:
    """``url`` with any password replaced by ***, for messages and reports."""
    return re.sub(r"(://[^:/@]+:)[^@]*@", r"\1***@", url)


def is_journal(url: str | None) -> bool:
    return url is None or url.startswith("journal:") or "://" not in url


def open_storage(url: str | None, default_journal: Path):
    """The storage ``url`` names (None: a journal file at ``default_journal``).

    Raises:
        InputError: optuna is missing, the journal's folder does not exist, or the database cannot be reached
            (driver missing, host down, wrong credentials) — one line, password masked.
    """
    optuna = require_optuna()
    if is_journal(url):
        from optuna.storages.journal import JournalFileBackend, JournalFileOpenLock

        path = default_journal if url is None else Path(url.removeprefix("journal:")).expanduser()
        if not path.parent.is_dir():
            raise InputError(f"--storage {url}: folder {path.parent} does not exist")
        return optuna.storages.JournalStorage(JournalFileBackend(str(path), lock_obj=JournalFileOpenLock(str(path))))
    from optuna.storages import RetryHeartbeatStaleTrialCallback

    retry = RetryHeartbeatStaleTrialCallback(max_retry=1)  # a dead worker's trial runs once more
    engine: dict[str, Any] = {"pool_pre_ping": True}
    if url.startswith(("postgresql", "mysql")):
        engine["connect_args"] = {"connect_timeout": 10}
    try:
        return optuna.storages.RDBStorage(url, engine_kwargs=engine, heartbeat_interval=30, grace_period=120,
                                          heartbeat_stale_trial_callback=retry)
    except ModuleNotFoundError as error:
        raise InputError(f"--storage {masked(url)}: its database driver is not installed ({error.name}; e.g. pip "
                         f"install psycopg2-binary for PostgreSQL)") from None
    except Exception as error:  # SQLAlchemy's errors: unreachable host, refused credentials, bad URL
        raise InputError(f"--storage {masked(url)}: cannot open the database ({describe(error, 200)})") from None


def make_sampler(name: str, seed: int, startup: int):
    optuna = require_optuna()
    if name == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    # Constraints reach the sampler through each trial's set_constraint (see torchslim.search.worker).
    return optuna.samplers.TPESampler(seed=seed, multivariate=True, group=True, constant_liar=True,
                                      n_startup_trials=startup)


def load_study(storage, name: str, sampler=None):
    """The study ``name`` in ``storage`` with its payload, or (None, None) when there is none."""
    optuna = require_optuna()
    try:
        study = optuna.load_study(study_name=name, storage=storage, sampler=sampler)
    except KeyError:
        return None, None
    return study, study.user_attrs.get(PAYLOAD)


def create_study(storage, name: str, directions: int, payload: dict, sampler):
    optuna = require_optuna()
    study = optuna.create_study(storage=storage, study_name=name, directions=["minimize"] * directions,
                                sampler=sampler, load_if_exists=True)
    study.set_user_attr(PAYLOAD, payload)
    return study


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def recover_interrupted(study, local_only: bool) -> list[int]:
    """Fail the trials left RUNNING by dead workers on this machine (and, when the journal is private to this
    search, RUNNING trials no worker claimed yet) and enqueue their plans again; returns their numbers."""
    from optuna.trial import TrialState

    host = socket.gethostname()
    lost = []
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        worker = trial.user_attrs.get("worker")
        if worker:
            where, _, pid = worker.rpartition(":")
            if where != host or _alive(int(pid)):
                continue
        elif not local_only:
            continue
        study.tell(trial.number, state=TrialState.FAIL)
        study.enqueue_trial(dict(trial.params), user_attrs={"retry_of": trial.number}, skip_if_exists=False)
        lost.append(trial.number)
    if lost:
        study.set_user_attr(INTERRUPTED, interrupted(study) + lost)
    return lost


INTERRUPTED = "torchslim.interrupted"  # study user attribute: numbers of the trials killed in flight


def interrupted(study) -> list[int]:
    """The trials that were failed because their worker died mid-trial (see `recover_interrupted`)."""
    return list(study.user_attrs.get(INTERRUPTED, []))


def counted(study) -> int:
    """Trials that count against the budget: completed, and failed by their own error (not interrupted)."""
    from optuna.trial import TrialState

    lost = set(interrupted(study))
    return sum(1 for trial in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.FAIL))
               if trial.number not in lost)
