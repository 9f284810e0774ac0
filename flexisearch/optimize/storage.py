"""Optuna storages of a study: a database URL or a journal file, opened so that processes sharing it never
claim the same trial, and opened for reading without ever creating one."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import optuna
import sqlalchemy

from ..errors import UserError


def _sqlite_claims_atomic(storage: optuna.storages.RDBStorage) -> None:
    """Begin every SQLite transaction with BEGIN IMMEDIATE. SQLite ignores SELECT ... FOR UPDATE and pysqlite
    begins a transaction only at the first write, so two processes can both read an enqueued trial as WAITING
    and both run it (Optuna's claim is read-then-write); with the write lock taken first, only one claims it."""
    @sqlalchemy.event.listens_for(storage.engine, "connect")
    def _no_implicit_begin(dbapi_connection: Any, _record: Any) -> None:
        dbapi_connection.isolation_level = None

    @sqlalchemy.event.listens_for(storage.engine, "begin")
    def _begin_immediate(connection: sqlalchemy.Connection) -> None:
        connection.exec_driver_sql("BEGIN IMMEDIATE")

    storage.engine.dispose()  # connections opened before the listeners are not reused


def _local_file(url: str) -> Path | None:
    """The file a SQLite URL or a journal path names (None: a database server)."""
    if url.startswith("sqlite:///"):
        return Path(url[len("sqlite:///"):])
    return None if "://" in url else Path(url)


def open_storage(url: str) -> optuna.storages.BaseStorage:
    """The study's storage: a database URL (with heartbeats: a trial whose process died on another machine
    is re-run), or a journal file's path, as optuna-dashboard takes it (e.g. runs/x/journal.log). The folder
    of a local file is created."""
    file = _local_file(url)
    if file is not None:
        file.parent.mkdir(parents=True, exist_ok=True)
    if "://" not in url:
        return optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(url))
    with warnings.catch_warnings():  # Optuna 5 flags heartbeats experimental, on every run
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        storage = optuna.storages.RDBStorage(
            url, heartbeat_interval=60, grace_period=180,
            heartbeat_stale_trial_callback=optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=2))
    if url.startswith("sqlite"):
        _sqlite_claims_atomic(storage)
    return storage


def existing_study(url: str, name: str) -> optuna.Study | None:
    """Study `name` in the storage at url, or None (no such storage or study): opening never creates one."""
    file = _local_file(url)
    if file is not None and not file.is_file():
        return None
    try:
        return optuna.load_study(study_name=name, storage=open_storage(url))
    except KeyError:
        return None
    except Exception as e:
        raise UserError(f"storage '{url}': cannot open ({str(e).splitlines()[0]})") from None
