#!/usr/bin/env bash
# Runs the whole test suite on a fresh machine: PostgreSQL server binaries, Dovecot and Chromium
# (from Debian's packages when missing), a virtualenv with chunkd and its test and docs extras,
# lint, mypy --strict (configured in pyproject.toml), the documentation site (strict: a broken link or
# a page missing from the nav fails), pytest.
set -euo pipefail
cd "$(dirname "$0")/.."

have_postgres() {
    command -v initdb >/dev/null 2>&1 && return 0
    compgen -G "/usr/lib/postgresql/*/bin/postgres" >/dev/null && return 0
    [ -n "${CHUNKD_TEST_DSN:-}" ]
}
if ! have_postgres; then
    echo "tests/run.sh: installing PostgreSQL server binaries" >&2
    if [ "$(id -u)" -eq 0 ]; then SUDO=""; else SUDO="sudo"; fi
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends postgresql >/dev/null
fi

# The IMAP example's test (tests/test_imap_sync.py) runs a real Dovecot.
if ! command -v dovecot >/dev/null 2>&1 && [ ! -x /usr/sbin/dovecot ]; then
    echo "tests/run.sh: installing Dovecot (dovecot-imapd)" >&2
    if [ "$(id -u)" -eq 0 ]; then SUDO=""; else SUDO="sudo"; fi
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends \
        dovecot-imapd >/dev/null
fi

# The dashboard's browser test drives Debian's Chromium (never a browser Playwright downloads).
if [ ! -x /usr/bin/chromium ]; then
    echo "tests/run.sh: installing Chromium for the browser test" >&2
    if [ "$(id -u)" -eq 0 ]; then SUDO=""; else SUDO="sudo"; fi
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends chromium >/dev/null
fi

PYTHON="${PYTHON:-python3}"
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install -q --disable-pip-version-check -e '.[test,docs]'

.venv/bin/ruff check .
.venv/bin/ruff format --check .
.venv/bin/mypy
# NO_MKDOCS_2_WARNING: Material's end-of-life notice, not a finding about these pages.
NO_MKDOCS_2_WARNING=1 .venv/bin/mkdocs build --strict --quiet --site-dir site
exec .venv/bin/python -m pytest "$@"
