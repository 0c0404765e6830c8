#!/usr/bin/env bash
# Install DataFlare as a systemd service.
#
#   sudo ./scripts/install.sh                 # onto this machine
#   DESTDIR=/tmp/root ./scripts/install.sh    # into a staging root (packaging, tests)
#
# What it puts in place (paths shown for the defaults):
#   $PREFIX/lib/dataflare/venv               the Python package in its own venv
#   $PREFIX/bin/dataflare, dataflare-tui     links to the venv's console scripts
#   $UNITDIR/dataflare.service               the unit, ExecStart pointed at $BINDIR
#   $SYSUSERSDIR/dataflare.conf              the dataflare user and group
#   $TMPFILESDIR/dataflare.conf              /etc/dataflare, /var/lib/dataflare modes
#   $SYSCONFDIR/dataflare/dataflare.yaml     the default config (never overwritten)
#   $SYSCONFDIR/dataflare/workflows.d/       empty: workflows go here
#   $SYSCONFDIR/dataflare/examples/          example workflows (refreshed each time)
#   $DOCDIR/systemd.md
#
# Variables: DESTDIR (staging root, default none), PREFIX (/usr/local), BINDIR,
# SYSCONFDIR (/etc), UNITDIR ($PREFIX/lib/systemd/system), SYSUSERSDIR,
# TMPFILESDIR, DOCDIR, PYTHON (python3 >= 3.11), INSTALL_VENV (1 without DESTDIR,
# else 0; 0 skips the venv: the unit then expects `dataflare` in $BINDIR some
# other way, e.g. a distribution package of the wheel).
# With DESTDIR set nothing outside DESTDIR is touched: no user is created and
# systemd is not told (run systemd-sysusers, systemd-tmpfiles --create and
# `systemctl daemon-reload` on the target instead).
set -euo pipefail

SRC="$(cd "$(dirname "$0")/.." && pwd)"
DESTDIR="${DESTDIR:-}"
PREFIX="${PREFIX:-/usr/local}"
BINDIR="${BINDIR:-$PREFIX/bin}"
SYSCONFDIR="${SYSCONFDIR:-/etc}"
LIBDIR="${LIBDIR:-$PREFIX/lib}"
UNITDIR="${UNITDIR:-$LIBDIR/systemd/system}"
SYSUSERSDIR="${SYSUSERSDIR:-$LIBDIR/sysusers.d}"
TMPFILESDIR="${TMPFILESDIR:-$LIBDIR/tmpfiles.d}"
DOCDIR="${DOCDIR:-$PREFIX/share/doc/dataflare}"
VENV="${VENV:-$LIBDIR/dataflare/venv}"
PYTHON="${PYTHON:-python3}"
# A venv is not relocatable: built in a staging root it would point into it.
if [ -n "$DESTDIR" ]; then INSTALL_VENV="${INSTALL_VENV:-0}"; else INSTALL_VENV="${INSTALL_VENV:-1}"; fi

say() { printf 'install: %s\n' "$*"; }
conf="$DESTDIR$SYSCONFDIR/dataflare"

# --- the program
if [ "$INSTALL_VENV" = 1 ]; then
    say "venv $DESTDIR$VENV"
    "$PYTHON" -m venv "$DESTDIR$VENV"
    "$DESTDIR$VENV/bin/pip" install --quiet --disable-pip-version-check "$SRC"
    install -d -m 0755 "$DESTDIR$BINDIR"
    for s in dataflare dataflare-tui; do
        ln -sfn "$VENV/bin/$s" "$DESTDIR$BINDIR/$s"
    done
fi

# --- systemd files
install -d -m 0755 "$DESTDIR$UNITDIR" "$DESTDIR$SYSUSERSDIR" "$DESTDIR$TMPFILESDIR" "$DESTDIR$DOCDIR"
sed -e "s|/usr/local/bin/dataflare|$BINDIR/dataflare|g" \
    -e "s|/etc/dataflare|$SYSCONFDIR/dataflare|g" \
    -e "s|file:///usr/local/share/doc/dataflare|file://$DOCDIR|g" \
    "$SRC/systemd/dataflare.service" >"$DESTDIR$UNITDIR/dataflare.service"
chmod 0644 "$DESTDIR$UNITDIR/dataflare.service"
install -m 0644 "$SRC/systemd/dataflare.sysusers" "$DESTDIR$SYSUSERSDIR/dataflare.conf"
sed -e "s|/etc/dataflare|$SYSCONFDIR/dataflare|g" "$SRC/systemd/dataflare.tmpfiles" \
    >"$DESTDIR$TMPFILESDIR/dataflare.conf"
chmod 0644 "$DESTDIR$TMPFILESDIR/dataflare.conf"
install -m 0644 "$SRC/docs/systemd.md" "$DESTDIR$DOCDIR/systemd.md"
say "unit $DESTDIR$UNITDIR/dataflare.service"

# --- configuration: defaults only where nothing is there yet
install -d -m 0750 "$conf" "$conf/workflows.d" "$conf/examples"
install -d -m 0700 "$conf/credentials"
if [ -e "$conf/dataflare.yaml" ]; then
    say "keeping $conf/dataflare.yaml"
else
    install -m 0640 "$SRC/etc/dataflare.yaml" "$conf/dataflare.yaml"
    say "config $conf/dataflare.yaml"
fi
for f in "$SRC"/etc/examples/*.yaml; do
    [ -e "$f" ] || continue
    install -m 0640 "$f" "$conf/examples/$(basename "$f")"
done

# --- the live system (only without DESTDIR, and only as root)
if [ -z "$DESTDIR" ] && [ "$(id -u)" = 0 ]; then
    if command -v systemd-sysusers >/dev/null; then
        systemd-sysusers "$SYSUSERSDIR/dataflare.conf"
    elif ! getent passwd dataflare >/dev/null; then
        useradd --system --user-group --home-dir /var/lib/dataflare \
            --shell /usr/sbin/nologin dataflare
    fi
    if command -v systemd-tmpfiles >/dev/null; then
        systemd-tmpfiles --create "$TMPFILESDIR/dataflare.conf"
    fi
    chgrp -R dataflare "$conf"
    if [ -d /run/systemd/system ]; then
        systemctl daemon-reload
        say "now: dataflare validate && systemctl enable --now dataflare"
    fi
elif [ -z "$DESTDIR" ]; then
    say "not root: create the user with systemd-sysusers $SYSUSERSDIR/dataflare.conf"
fi
say done
