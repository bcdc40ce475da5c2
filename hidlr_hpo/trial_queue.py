"""A study's trials as a work queue that any number of workers share and that a killed run leaves resumable.

Each configuration to train (a grid point, a single run, a search's k-th proposal) is a trial enqueued with
a ``queue_key`` user attribute. A worker claims a trial by moving it from WAITING to RUNNING, which the
storage does for one worker only (Optuna's own queue pop: ``set_trial_state_values`` refuses a trial that
is no longer WAITING). Two workers that start together may enqueue the same configuration twice; the rule
"the lowest-numbered live trial of a key runs, a later one is a duplicate" (:func:`is_duplicate`) then lets
exactly one of them train it, because a trial's number is fixed when it is created, before any worker can
claim it.

A worker that dies leaves its trial RUNNING. :func:`fail_stale` marks such trials FAIL, so that their
configuration is enqueued again: on an RDB storage (SQLite, PostgreSQL, MySQL) through Optuna's heartbeat
(a RUNNING trial whose worker has not beaten for :data:`GRACE_SECONDS`), and on any storage at once when
the trial's owner is a process of this machine that no longer exists (a ``kill -9``, a crash, a closed
terminal).
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import random
import socket
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from datetime import datetime, timedelta
from typing import Any, TypeVar

import optuna
import sqlalchemy.engine
import sqlalchemy.exc
from optuna.storages import BaseStorage, RDBStorage
from optuna.storages.journal import JournalFileBackend, JournalStorage
from optuna.trial import FrozenTrial, TrialState, create_trial

from .storage import JOURNAL_PREFIX, storage_file

__all__ = [
    "GRACE_SECONDS",
    "HEARTBEAT_SECONDS",
    "claim",
    "enqueue",
    "fail_stale",
    "is_duplicate",
    "open_storage",
    "queue_key",
    "run_claimed",
]

_T = TypeVar("_T")

#: how often a running trial's worker records that it is alive (RDB storages)
HEARTBEAT_SECONDS = 10
#: a RUNNING trial whose worker has not beaten for this long is failed, and its configuration run again
GRACE_SECONDS = 60
_OWNER = "owner"  # user attribute: "host:pid" of the worker that claimed the trial
_KEY = "queue_key"  # user attribute: the configuration's identity within its study


def open_storage(url: str) -> BaseStorage:
    """The Optuna storage of ``url``, once per process and file: an RDB storage with heartbeats, or a journal
    file (``journal:///path/to/file.log``: Optuna's ``JournalFileStorage``, for a shared file system). A
    relative SQLite or journal path is taken from the current folder."""
    file = storage_file(url)
    if file is not None and not file.is_absolute():
        if url.startswith(JOURNAL_PREFIX):
            url = JOURNAL_PREFIX + str(file.resolve())
        else:
            url = (
                sqlalchemy.engine.make_url(url).set(database=str(file.resolve())).render_as_string(hide_password=False)
            )
    return _open(url)


@functools.cache
def _open(url: str) -> BaseStorage:
    if url.startswith(JOURNAL_PREFIX):
        return JournalStorage(JournalFileBackend(url[len(JOURNAL_PREFIX) :]))
    engine_kwargs: dict[str, Any] = {}
    if url.startswith("sqlite"):
        # Several workers write to one file: wait for the lock instead of failing after SQLite's 5 s.
        engine_kwargs["connect_args"] = {"timeout": 120}
    for attempt in range(5):
        try:
            with warnings.catch_warnings():  # heartbeats are "experimental" in Optuna since 2.9
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                return RDBStorage(
                    url, engine_kwargs=engine_kwargs, heartbeat_interval=HEARTBEAT_SECONDS, grace_period=GRACE_SECONDS
                )
        except sqlalchemy.exc.SQLAlchemyError as exc:
            # Workers that start together on a new database race to create its tables; the loser finds them
            # made a moment later.
            if attempt == 4:
                reason = str(getattr(exc, "orig", None) or exc).strip().splitlines()[0]
                raise ValueError(f"storage {url!r} cannot be opened: {reason}") from None
            time.sleep(0.5 + attempt)
    raise AssertionError("unreachable")


def queue_key(params: dict[str, Any]) -> str:
    """A configuration's identity: its parameters, in a stable text form."""
    return json.dumps(params, sort_keys=True)


def key_of(trial: FrozenTrial) -> str:
    """The trial's configuration key (for a trial made before keys: its fixed or sampled parameters)."""
    if _KEY in trial.user_attrs:
        return trial.user_attrs[_KEY]
    return queue_key(trial.system_attrs.get("fixed_params") or trial.params)


def enqueue(study: optuna.Study, params: dict[str, Any], key: str) -> None:
    """Add a WAITING trial that will run ``params`` (as ``study.enqueue_trial``), tagged with its key."""
    waiting = create_trial(state=TrialState.WAITING, system_attrs={"fixed_params": params}, user_attrs={_KEY: key})
    _retrying(lambda: study.add_trial(waiting))


def _retrying(call: Callable[[], _T]) -> _T:
    """``call()``, again after a moment when the database reports a conflict (SQLite's "database is locked"
    when two workers' transactions cross; Optuna retries its own trial creation the same way)."""
    for attempt in range(8):
        try:
            return call()
        except optuna.exceptions.StorageInternalError:
            if attempt == 7:
                raise
            time.sleep(random.random() * (0.5 + attempt))
    raise AssertionError("unreachable")


def claim(study: optuna.Study, wanted: Callable[[str], bool] = lambda key: True) -> optuna.Trial | None:
    """Take the lowest-numbered WAITING trial whose key is ``wanted`` for this worker, or None.

    The storage moves a trial from WAITING to RUNNING for one caller only; a trial another worker took
    first is skipped. A WAITING trial that is not wanted (a grid value since removed from the study file,
    a step enqueued by an older version) is closed as FAIL, untrained, instead of run.
    """
    storage = study._storage
    for trial in study.get_trials(deepcopy=False, states=(TrialState.WAITING,)):
        trial_id = trial._trial_id
        if not wanted(key_of(trial)):
            with contextlib.suppress(optuna.exceptions.UpdateFinishedTrialError):
                _retrying(lambda trial_id=trial_id: storage.set_trial_state_values(trial_id, state=TrialState.FAIL))
            continue
        try:
            if not _retrying(
                lambda trial_id=trial_id: storage.set_trial_state_values(trial_id, state=TrialState.RUNNING)
            ):
                continue
        except optuna.exceptions.UpdateFinishedTrialError:
            continue
        _retrying(lambda trial_id=trial_id: storage.set_trial_user_attr(trial_id, _OWNER, _this_worker()))
        return optuna.Trial(study, trial._trial_id)
    return None


def is_duplicate(study: optuna.Study, trial: optuna.Trial, counts: Callable[[FrozenTrial], bool]) -> bool:
    """Whether a lower-numbered trial of the same key is waiting, running or done (``counts`` says which
    finished trials count as done): then that one is the key's trial, and this one must not run."""
    mine = study._storage.get_trial(trial._trial_id)
    key = key_of(mine)
    for other in study.get_trials(deepcopy=False):
        if other.number >= mine.number or key_of(other) != key:
            continue
        if other.state in (TrialState.WAITING, TrialState.RUNNING) or counts(other):
            return True
    return False


def fail_stale(study: optuna.Study) -> list[FrozenTrial]:
    """Mark FAIL the RUNNING trials whose worker is gone, and return them (each failed by this call only).

    Gone: a process of this machine that no longer exists; on an RDB storage also a worker anywhere whose
    heartbeat stopped more than :data:`GRACE_SECONDS` ago (Optuna's ``fail_stale_trials``); and a trial
    with no owner that started more than that ago (left by a version without owners).
    """
    storage = study._storage
    stale_ids: set[int] = set()
    if isinstance(storage, RDBStorage):
        stale_ids.update(storage._get_stale_trial_ids(study._study_id))
    old = datetime.now() - timedelta(seconds=GRACE_SECONDS)
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        owner = trial.user_attrs.get(_OWNER)
        if owner is None:
            if trial.datetime_start is not None and trial.datetime_start < old:
                stale_ids.add(trial._trial_id)
        elif _dead_here(owner):
            stale_ids.add(trial._trial_id)
    failed = []
    for trial_id in sorted(stale_ids):
        try:
            if _retrying(lambda trial_id=trial_id: storage.set_trial_state_values(trial_id, state=TrialState.FAIL)):
                failed.append(storage.get_trial(trial_id))
        except optuna.exceptions.UpdateFinishedTrialError:
            pass  # another worker failed it first
    return failed


def run_claimed(study: optuna.Study, trial: optuna.Trial, objective: Callable[[optuna.Trial], float]) -> FrozenTrial:
    """Run a claimed trial and record how it ended, as ``study.optimize`` would: its value, PRUNED, or FAIL
    (an exception in training is recorded and returned; an interrupt is recorded and raised again)."""
    # skip_if_finished: another worker may have failed the trial meanwhile (this one was paused longer than
    # the grace period); its end is then already recorded, and the configuration is being run again.
    with _heartbeat(study._storage, trial._trial_id):
        try:
            value = objective(trial)
        except optuna.TrialPruned:
            return _retrying(lambda: study.tell(trial, state=TrialState.PRUNED, skip_if_finished=True))
        except Exception:
            return _retrying(lambda: study.tell(trial, state=TrialState.FAIL, skip_if_finished=True))
        except BaseException:
            _retrying(lambda: study.tell(trial, state=TrialState.FAIL, skip_if_finished=True))
            raise
    return _retrying(lambda: study.tell(trial, value, skip_if_finished=True))


@contextlib.contextmanager
def _heartbeat(storage: BaseStorage, trial_id: int) -> Iterator[None]:
    """Record the trial's heartbeat every :data:`HEARTBEAT_SECONDS` while it runs (RDB storages)."""
    if not isinstance(storage, RDBStorage) or storage.get_heartbeat_interval() is None:
        yield
        return
    stop = threading.Event()

    def beat() -> None:
        while True:
            with contextlib.suppress(Exception):  # a locked or dropped database: the next beat will do
                storage.record_heartbeat(trial_id)
            if stop.wait(HEARTBEAT_SECONDS):
                return

    thread = threading.Thread(target=beat, name=f"heartbeat-{trial_id}", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


def _this_worker() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def _dead_here(owner: str) -> bool:
    """Whether ``owner`` ("host:pid") is a process of this machine that no longer exists."""
    host, _, pid = owner.rpartition(":")
    if host != socket.gethostname() or not pid.isdigit():
        return False
    try:
        os.kill(int(pid), 0)  # signal 0: asks whether the process exists, sends nothing
    except ProcessLookupError:
        return True
    except PermissionError:
        return False  # exists, owned by another user
    return False
