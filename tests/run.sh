#!/usr/bin/env bash
# Runs the whole test suite on a fresh machine: what the tests need from Debian's packages when
# it is missing (PostgreSQL server binaries, PgBouncer for the transaction-pooler tests,
# libfaketime for the clock-skew tests, Dovecot for the IMAP example, Chromium for the
# dashboard's browser test; never a browser Playwright downloads), a virtualenv with chunkd and its test and docs extras,
# lint, mypy --strict (configured in pyproject.toml), the documentation site (strict: a broken
# link or a page missing from the nav fails), pytest. Under CI a test whose resource is missing
# fails instead of skipping.
set -euo pipefail
cd "$(dirname "$0")/.."

have_postgres() {
    command -v initdb >/dev/null 2>&1 && return 0
    compgen -G "/usr/lib/postgresql/*/bin/postgres" >/dev/null && return 0
    [ -n "${CHUNKD_TEST_DSN:-}" ]
}
have_pgbouncer() {
    command -v pgbouncer >/dev/null 2>&1 || [ -x /usr/sbin/pgbouncer ]
}
have_faketime() {
    compgen -G "/usr/lib/*/faketime/libfaketime.so.1" >/dev/null
}
have_dovecot() {
    command -v dovecot >/dev/null 2>&1 || [ -x /usr/sbin/dovecot ]
}
missing=()
have_postgres || missing+=(postgresql)
have_pgbouncer || missing+=(pgbouncer)
have_faketime || missing+=(faketime)
have_dovecot || missing+=(dovecot-imapd)
[ -x /usr/bin/chromium ] || missing+=(chromium)
if [ "${#missing[@]}" -gt 0 ]; then
    echo "tests/run.sh: installing ${missing[*]}" >&2
    if [ "$(id -u)" -eq 0 ]; then SUDO=""; else SUDO="sudo"; fi
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends \
        "${missing[@]}" >/dev/null
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
