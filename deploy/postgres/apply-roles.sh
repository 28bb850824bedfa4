#!/bin/sh
# Apply roles.sql to the studyq database as its admin, then set the roles' passwords.
#
#   PGHOST=db.example.org PGUSER=postgres PGDATABASE=studyq \
#   STUDYQ_WORKER_DB_PASSWORD_FILE=/run/secrets/worker_db_password ... \
#   sh deploy/postgres/apply-roles.sh
#
# The connection comes from libpq's variables (PGHOST, PGPORT, PGUSER, PGDATABASE, PGPASSWORD
# or PGPASSFILE). Each role's password comes from STUDYQ_<ROLE>_DB_PASSWORD or, better, from
# the file named by STUDYQ_<ROLE>_DB_PASSWORD_FILE (<ROLE> is COORDINATOR, WORKER or
# ANALYST); a role with neither keeps its password. Passwords never appear on a command line:
# psql reads them from its environment (\getenv, psql 15 or newer). Idempotent: docker
# compose runs it before every `studyq db upgrade` (and once more after it, which is no longer
# needed: the upgrade grants the roles itself).
set -eu

here=$(cd "$(dirname "$0")" && pwd)
psql -X -q -v ON_ERROR_STOP=1 -f "$here/roles.sql"

for role in coordinator worker analyst; do
    upper=$(printf '%s' "$role" | tr '[:lower:]' '[:upper:]')
    eval "password=\${STUDYQ_${upper}_DB_PASSWORD:-}"
    eval "password_file=\${STUDYQ_${upper}_DB_PASSWORD_FILE:-}"
    if [ -n "$password_file" ]; then
        password=$(cat "$password_file")
    fi
    if [ -z "$password" ]; then
        echo "apply-roles: no password given for studyq_$role; it keeps the one it has." >&2
        continue
    fi
    STUDYQ_ROLE_PASSWORD=$password psql -X -q -v ON_ERROR_STOP=1 -v role="studyq_$role" <<'SQL'
\getenv password STUDYQ_ROLE_PASSWORD
ALTER ROLE :"role" PASSWORD :'password';
SQL
done
echo "apply-roles: roles and passwords are in place." >&2
