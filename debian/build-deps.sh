#!/usr/bin/env bash
# Called by make deb: the tools to build the Debian packages are there, or,
# as root on Debian, installed with apt-get (debian/control's Build-Depends
# plus dpkg-dev, build-essential and lintian).  Otherwise one line says
# what to install.
set -euo pipefail
cd "$(dirname "$0")/.."

missing() {
    command -v dpkg-buildpackage >/dev/null && command -v lintian >/dev/null \
        && command -v gcc >/dev/null && dpkg-checkbuilddeps debian/control 2>/dev/null
}

if missing; then
    exit 0
fi
if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null; then
    echo "make deb: build dependencies missing; as root: apt-get install dpkg-dev build-essential lintian && apt-get build-dep ./" >&2
    exit 1
fi
export DEBIAN_FRONTEND=noninteractive
# A fresh machine (or container) may have no package lists yet.
if ! ls /var/lib/apt/lists/*_Packages >/dev/null 2>&1; then
    apt-get update -q
fi
apt-get install -y -q --no-install-recommends dpkg-dev build-essential lintian \
    || { apt-get update -q && apt-get install -y -q --no-install-recommends dpkg-dev build-essential lintian; }
apt-get build-dep -y -q ./
