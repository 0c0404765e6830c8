#!/usr/bin/env bash
# Make sure the PostgreSQL 15 and MariaDB server binaries that the test fixtures
# (tests/servers.py) start privately are installed. A no-op when they are present;
# otherwise installs the missing Debian packages (postgresql-15, mariadb-server).
# It only installs binaries: the fixtures run their own servers in temp dirs on
# free ports and never use or reconfigure a system service.
set -euo pipefail

have_postgres() {
    local bindir
    if command -v pg_config >/dev/null 2>&1; then
        bindir="$(pg_config --bindir 2>/dev/null || true)"
        if [[ -n "$bindir" && -x "$bindir/postgres" && -x "$bindir/initdb" ]]; then
            return 0
        fi
    fi
    local d
    for d in /usr/lib/postgresql/*/bin; do
        if [[ -x "$d/postgres" && -x "$d/initdb" ]]; then
            return 0
        fi
    done
    return 1
}

have_mariadb() {
    local path="$PATH:/usr/sbin:/usr/local/sbin:/sbin"
    PATH="$path" command -v mariadbd >/dev/null 2>&1 &&
        PATH="$path" command -v mariadb-install-db >/dev/null 2>&1
}

packages=()
have_postgres || packages+=(postgresql-15)
have_mariadb || packages+=(mariadb-server)

if ((${#packages[@]} == 0)); then
    exit 0
fi

echo "ensure-servers: installing ${packages[*]}" >&2
sudo=()
if ((EUID != 0)); then
    if command -v sudo >/dev/null 2>&1; then
        sudo=(sudo)
    else
        echo "ensure-servers: need root (or sudo) to install ${packages[*]}" >&2
        exit 1
    fi
fi
export DEBIAN_FRONTEND=noninteractive
"${sudo[@]}" apt-get update
"${sudo[@]}" apt-get install -y --no-install-recommends "${packages[@]}"

if ! have_postgres || ! have_mariadb; then
    echo "ensure-servers: server binaries still missing after installing ${packages[*]}" >&2
    exit 1
fi
