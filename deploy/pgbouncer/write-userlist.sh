#!/bin/sh
# Write PgBouncer's auth_file for studyq's roles, then run the given command (PgBouncer).
#
#   STUDYQ_WORKER_DB_PASSWORD_FILE=/run/secrets/worker_db_password ... \
#   sh deploy/pgbouncer/write-userlist.sh /etc/pgbouncer/auth/userlist.txt \
#       pgbouncer /etc/pgbouncer/pgbouncer.ini
#   sh deploy/pgbouncer/write-userlist.sh - > userlist.txt      # for a Kubernetes Secret
#
# Each role's password comes from STUDYQ_<ROLE>_DB_PASSWORD or the file named by
# STUDYQ_<ROLE>_DB_PASSWORD_FILE (<ROLE>: COORDINATOR, WORKER, ANALYST), as for
# deploy/postgres/apply-roles.sh, which sets the same passwords in PostgreSQL. PgBouncer
# needs them in plain text to answer SCRAM for the client and log in to PostgreSQL with it.
# STUDYQ_<ROLE>_DB_USER names the login when it is not studyq_<role> (a member of the
# role, as docs/deploy.md suggests for people). A role without a password is left out
# (PgBouncer then refuses it). The file is written
# with mode 0600; passwords never appear on a command line.
set -eu

out=${1:?usage: write-userlist.sh OUTPUT|- [COMMAND...]}
shift

entries=""
for role in coordinator worker analyst; do
    upper=$(printf '%s' "$role" | tr '[:lower:]' '[:upper:]')
    eval "password=\${STUDYQ_${upper}_DB_PASSWORD:-}"
    eval "password_file=\${STUDYQ_${upper}_DB_PASSWORD_FILE:-}"
    eval "user=\${STUDYQ_${upper}_DB_USER:-studyq_$role}"
    if [ -n "$password_file" ]; then
        password=$(cat "$password_file")
    fi
    if [ -z "$password" ]; then
        echo "write-userlist: no password given for $user; PgBouncer will refuse it." >&2
        continue
    fi
    # auth_file syntax: "user" "password", a double quote inside doubled.
    quoted=$(printf '%s' "$password" | sed 's/"/""/g')
    entries="$entries\"$user\" \"$quoted\"
"
done

if [ "$out" = "-" ]; then
    printf '%s' "$entries"
else
    umask 077
    printf '%s' "$entries" > "$out"
    echo "write-userlist: $out written." >&2
fi

if [ "$#" -gt 0 ]; then
    exec "$@"
fi
