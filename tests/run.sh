#!/usr/bin/env bash
# Runs the whole test suite on a fresh machine. First checks for Python 3.11 or newer ($PYTHON,
# default python3; one line and exit 1 otherwise), then installs, saying what: what the tests
# need from Debian's packages when it is missing (PostgreSQL server binaries, PgBouncer for the transaction-pooler tests,
# libfaketime for the clock-skew tests, Dovecot for the IMAP example, Chromium for the
# dashboard's browser test; never a browser Playwright downloads), a virtualenv with chunkd and its test and docs extras,
# lint, mypy --strict (configured in pyproject.toml), the documentation site (strict: a broken
# link or a page missing from the nav fails), pytest. Under CI a test whose resource is missing
# fails instead of skipping.
set -euo pipefail
cd "$(dirname "$0")/.."

# chunkd needs Python 3.11 or newer: say so in one line, before installing anything.
PYTHON="${PYTHON:-python3}"
if ! version=$("$PYTHON" -c 'import sys; print(sys.version.split()[0]); sys.exit(sys.version_info < (3, 11))' 2>/dev/null); then
    echo "tests/run.sh: chunkd needs Python 3.11 or newer, and $PYTHON is ${version:-not found}: run it with a newer one, e.g. PYTHON=python3.12 bash tests/run.sh" >&2
    exit 1
fi

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
    echo "tests/run.sh: installing from Debian's packages (apt-get): ${missing[*]}" >&2
    if [ "$(id -u)" -eq 0 ]; then SUDO=""; else SUDO="sudo"; fi
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends \
        "${missing[@]}" >/dev/null
fi

if [ ! -x .venv/bin/python ]; then
    echo "tests/run.sh: creating the virtualenv .venv (Python $version)" >&2
    "$PYTHON" -m venv .venv
fi
echo "tests/run.sh: installing chunkd (editable) with its [test,docs] extras into .venv (pip)" >&2
.venv/bin/python -m pip install -q --disable-pip-version-check -e '.[test,docs]'

.venv/bin/ruff check .
.venv/bin/ruff format --check .
.venv/bin/mypy
# NO_MKDOCS_2_WARNING: Material's end-of-life notice, not a finding about these pages. Not
# --quiet: it hides the warnings that --strict counts, and a broken link then passes.
NO_MKDOCS_2_WARNING=1 .venv/bin/mkdocs build --strict --site-dir site
exec .venv/bin/python -m pytest "$@"
