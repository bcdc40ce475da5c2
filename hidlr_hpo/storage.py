"""Optuna storage URLs checked at the boundary: a bad one is one clear line before anything is written.

Optuna hands the URL to SQLAlchemy at the first trial, so a typo, a SQLite file in a folder that does not
exist or a database without its driver used to surface as a long traceback (and, for SQLite, after other
files were written). :func:`check_storage_url` asks SQLAlchemy the same questions up front.
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["JOURNAL_PREFIX", "check_storage_url", "storage_file"]

#: Optuna's JournalFileStorage: ``journal:///path/to/study.log`` (relative) or ``journal:////abs/path.log``
JOURNAL_PREFIX = "journal:///"

#: the pip package that provides a DBAPI module SQLAlchemy asks for
_DRIVER_PACKAGES = {
    "psycopg": "psycopg[binary]",
    "psycopg2": "psycopg2-binary",
    "MySQLdb": "mysqlclient",
    "pymysql": "pymysql",
    "asyncpg": "asyncpg",
}
_EXAMPLES = "sqlite:///hidlr-studies.db, postgresql+psycopg://user@host/database or journal:///studies.log"


def check_storage_url(url: str) -> str:
    """Return ``url`` if Optuna can open it here; otherwise raise a ValueError that says what to change.

    Checked: that it parses as a database URL, that SQLAlchemy knows the database, that its driver imports,
    and for SQLite that the file's folder exists (Optuna creates the file, not the folder). Nothing is
    created or connected to.
    """
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError, NoSuchModuleError

    if url.startswith(JOURNAL_PREFIX):
        _check_folder(url, Path(url[len(JOURNAL_PREFIX) :]))
        return url
    try:
        parsed = make_url(url)
    except ArgumentError:
        raise ValueError(f"storage {url!r} is not a database URL; use one like {_EXAMPLES}") from None
    try:
        dialect = parsed.get_dialect()
    except NoSuchModuleError:
        raise ValueError(
            f"storage {url!r}: SQLAlchemy knows no database {parsed.drivername!r}; use sqlite, postgresql or mysql "
            f"(e.g. {_EXAMPLES})"
        ) from None
    try:
        dialect.import_dbapi()
    except ImportError as exc:
        module = exc.name or str(exc)
        package = _DRIVER_PACKAGES.get(module, module)
        raise ValueError(
            f"storage {url!r} needs the database driver {module!r}, which is not installed: pip install '{package}'"
        ) from None
    if parsed.get_backend_name() == "sqlite" and parsed.database not in (None, "", ":memory:"):
        _check_folder(url, Path(parsed.database))
    return url


def _check_folder(url: str, file: Path) -> None:
    folder = file.expanduser().parent
    if not folder.is_dir():
        raise ValueError(
            f"storage {url!r}: the folder {str(folder)!r} does not exist; create it or choose another path"
        )


def storage_file(url: str) -> Path | None:
    """The file of a SQLite or journal storage URL (None for other databases and in-memory SQLite)."""
    from sqlalchemy.engine import make_url

    if url.startswith(JOURNAL_PREFIX):
        return Path(url[len(JOURNAL_PREFIX) :]).expanduser()
    parsed = make_url(url)
    if parsed.get_backend_name() != "sqlite" or parsed.database in (None, "", ":memory:"):
        return None
    return Path(parsed.database).expanduser()
