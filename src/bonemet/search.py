"""Optuna, in one place: the search spaces and the studies of the classifiers' tuning
(``bonemet.modeling.tuning``) and of segmentation's (``bonemet.segmentation.training.tune``).

A space maps a hyperparameter name to a :class:`~bonemet.config.FloatRange`,
:class:`~bonemet.config.IntRange` or :class:`~bonemet.config.Choice` (``train.search_space``
and ``segment.tune.search_space`` in params.yaml: ``{type: float, low, high, log}``,
``{type: int, low, high, step, log}``, ``{type: categorical, choices}``).

A study is made one way (:func:`make_study`): TPE seeded with the tuning's seed (the same seed
gives the same trials in memory), a median pruner that starts after ``pruner_startup_trials``
trials and the first reported step, and a storage: None, in memory in this process; an SQLAlchemy
URL, the named study in that database, created or resumed (its finished trials count towards
``n_trials``: :func:`remaining_trials`), shared by every process pointed at it (the sampler then
treats running trials as poor results, so that two processes do not propose the same point).
This is the only module that imports optuna (tests/test_layers.py).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from bonemet.config import Choice, FloatRange, IntRange


def suggest(trial: Any, space: Mapping[str, FloatRange | IntRange | Choice]) -> dict[str, Any]:
    """One trial's hyperparameters from ``space`` (names in the space's order)."""
    params: dict[str, Any] = {}
    for name, spec in space.items():
        if isinstance(spec, FloatRange):
            params[name] = trial.suggest_float(name, spec.low, spec.high, log=spec.log)
        elif isinstance(spec, IntRange):
            params[name] = trial.suggest_int(name, spec.low, spec.high, step=spec.step, log=spec.log)
        else:
            params[name] = trial.suggest_categorical(name, list(spec.choices))
    return params


# --- studies ---------------------------------------------------------------------------------------


def study_digest(spec: Mapping[str, Any], *chunks: bytes) -> str:
    """16 hex digits of ``spec`` (JSON, keys sorted; search-space entries as their JSON) and the byte
    ``chunks`` (the tuning data): the deterministic part of a study's name in a shared storage, so
    that a rerun resumes its study and a change of settings or data starts a new one."""
    h = hashlib.sha256()
    h.update(json.dumps(spec, sort_keys=True, default=_jsonable).encode())
    for chunk in chunks:
        h.update(chunk)
    return h.hexdigest()[:16]


def _jsonable(value: Any) -> Any:
    return value.model_dump(mode="json") if hasattr(value, "model_dump") else str(value)


def space_json(space: Mapping[str, FloatRange | IntRange | Choice]) -> dict[str, Any]:
    """A search space as plain JSON values (for :func:`study_digest`)."""
    return {k: (v.model_dump(mode="json") if hasattr(v, "model_dump") else v) for k, v in space.items()}


def storage_for_log(url: str | None) -> str:
    """A study's storage as it may be logged: the database URL with any password masked (``memory``
    for none)."""
    if url is None:
        return "memory"
    from sqlalchemy.engine import make_url

    return make_url(url).render_as_string(hide_password=True)


def _sampler_and_pruner(seed: int, pruner_startup_trials: int, shared: bool) -> tuple[Any, Any]:
    import optuna

    # constant liar: a process sampling while another's trial runs treats it as a poor result, so two
    # processes do not propose the same point (only matters with running trials: a shared study)
    sampler = optuna.samplers.TPESampler(seed=seed, constant_liar=shared)
    pruner = optuna.pruners.MedianPruner(n_startup_trials=pruner_startup_trials, n_warmup_steps=1)
    return sampler, pruner


def make_study(name: str, *, seed: int, pruner_startup_trials: int, storage: str | None,
               direction: str = "maximize") -> Any:
    """The study ``name`` to maximise (or ``direction``): in memory (``storage`` None), or created or
    resumed in the database ``storage`` (see the module docstring)."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    sampler, pruner = _sampler_and_pruner(seed, pruner_startup_trials, shared=storage is not None)
    return optuna.create_study(direction=direction, sampler=sampler, pruner=pruner, study_name=name,
                               storage=storage, load_if_exists=storage is not None)


def load_study(name: str, *, seed: int, pruner_startup_trials: int, storage: str) -> Any:
    """The shared study ``name`` in ``storage`` as another process tuning it sees it (its own
    connection; sampler seeded with ``seed``)."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    sampler, pruner = _sampler_and_pruner(seed, pruner_startup_trials, shared=True)
    return optuna.load_study(study_name=name, storage=storage, sampler=sampler, pruner=pruner)


def finished_trials(study: Any) -> list[Any]:
    """The study's complete and pruned trials (what counts towards ``n_trials``)."""
    import optuna

    states = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
    return list(study.get_trials(deepcopy=False, states=states))


def remaining_trials(study: Any, n_trials: int) -> int:
    """How many trials are left to reach ``n_trials`` (a resumed study's finished trials count)."""
    return max(0, int(n_trials) - len(finished_trials(study)))


def is_pruned(trial: Any) -> bool:
    """Whether a (frozen) trial was pruned."""
    import optuna

    return trial.state == optuna.trial.TrialState.PRUNED


def should_prune(trial: Any, value: float, step: int) -> bool:
    """Report the trial's running ``value`` at ``step``; whether the pruner stops it."""
    trial.report(float(value), int(step))
    return bool(trial.should_prune())


def prune(trial: Any, value: float, step: int) -> None:
    """Report the trial's running ``value`` at ``step``; raise the pruner's stop when it says so."""
    if should_prune(trial, value, step):
        raise_pruned()


def raise_pruned() -> None:
    """End the running trial as pruned (Optuna's ``TrialPruned``)."""
    import optuna

    raise optuna.TrialPruned()


def optimize(study: Any, objective: Callable[[Any], float], n_trials: int,
             callbacks: Sequence[Callable[[Any, Any], None]] = ()) -> None:
    """``n_trials`` trials of ``objective`` in this process."""
    study.optimize(objective, n_trials=int(n_trials), callbacks=list(callbacks))


def trials_frame(study: Any, trials: Sequence[Any]) -> Any:
    """``trials`` of ``study`` as a table: number, value, params, state, duration (seconds)."""
    frame = study.trials_dataframe(attrs=("number", "value", "params", "state", "duration"))
    numbers = {t.number for t in trials}
    frame = frame[frame["number"].isin(numbers)].reset_index(drop=True)
    if "duration" in frame:
        frame["duration"] = frame["duration"].dt.total_seconds()
    return frame
