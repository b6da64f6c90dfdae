#!/usr/bin/env bash
# Makes sure the database servers the tests use are up: PostgreSQL on
# 127.0.0.1:5432 (user postgres, no password) and MariaDB on 127.0.0.1:3306
# (root, empty password); and that HAProxy is installed (the tests run
# their own).  Called by 'make test'.
#
# - Running already: nothing to do.
# - Installed but stopped: started, with the commands the README gives.
# - Not installed, and we are root on Debian: installed from Debian's
#   packages, started, and opened to those test logins on loopback only.
#   This is meant for a fresh test machine or CI; it changes nothing on a
#   machine where the servers are already installed.
# It never fails the build itself: a test that still cannot reach a server
# fails with the command that starts it.
set -u

up() {  # up PORT: something listens on 127.0.0.1:PORT
    python3 -c "import socket,sys; socket.create_connection(('127.0.0.1', int(sys.argv[1])), 2).close()" "$1" 2>/dev/null
}

wait_up() {  # wait_up PORT NAME
    for _ in $(seq 60); do up "$1" && return 0; sleep 0.5; done
    echo "services: $2 is still not reachable on 127.0.0.1:$1" >&2
    return 1
}

can_install() {
    [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1
}

apt_install() {
    echo "services: installing $* from Debian's packages"
    if [ ! -f /tmp/.mtop-apt-updated ]; then apt-get -o DPkg::Lock::Timeout=600 update -qq && touch /tmp/.mtop-apt-updated; fi
    DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=600 install -y -qq "$@" >/dev/null
}

postgres() {
    up 5432 && return 0
    local fresh=0
    if ! ls /etc/postgresql/*/main >/dev/null 2>&1; then
        can_install || { echo "services: PostgreSQL is not installed (apt-get install postgresql)" >&2; return 1; }
        apt_install postgresql || return 1
        fresh=1
    fi
    local version
    version=$(ls /etc/postgresql | sort -V | tail -n 1)
    if [ "$fresh" = 1 ]; then
        # Loopback logins as postgres without a password, for the tests.
        local hba="/etc/postgresql/$version/main/pg_hba.conf"
        sed -i '1i host all postgres 127.0.0.1/32 trust\nhost all postgres ::1/128 trust' "$hba"
    fi
    echo "services: starting PostgreSQL $version"
    pg_ctlcluster --skip-systemctl-redirect "$version" main start || true
    wait_up 5432 PostgreSQL
}

mariadb() {
    up 3306 && return 0
    local fresh=0
    if [ ! -x /usr/sbin/mariadbd ]; then
        can_install || { echo "services: MariaDB is not installed (apt-get install mariadb-server)" >&2; return 1; }
        apt_install mariadb-server || return 1
        fresh=1
    fi
    echo "services: starting MariaDB"
    mkdir -p /run/mysqld && chown mysql:mysql /run/mysqld 2>/dev/null
    start-stop-daemon --start --oknodo --background --exec /usr/sbin/mariadbd
    wait_up 3306 MariaDB || return 1
    if [ "$fresh" = 1 ]; then
        # root over TCP with an empty password, for the tests (loopback only:
        # Debian's MariaDB binds 127.0.0.1).
        mariadb -u root -e "ALTER USER root@localhost IDENTIFIED VIA unix_socket OR mysql_native_password USING PASSWORD('')" || true
    fi
}

haproxy_program() {
    # The cluster tests start HAProxy themselves, from configs of their own
    # on loopback ports; only the program is needed (Debian's package also
    # installs a system service, which is not started where there is no
    # systemd, and is not used).
    command -v haproxy >/dev/null 2>&1 && return 0
    can_install || { echo "services: HAProxy is not installed (apt-get install haproxy)" >&2; return 1; }
    apt_install haproxy
}

shadowsocks_programs() {
    # The SIP003 tests run ss-server and ss-local (shadowsocks-libev) with
    # our plugins, from command lines of their own on loopback ports.
    command -v ss-server >/dev/null 2>&1 && command -v ss-local >/dev/null 2>&1 && return 0
    can_install || { echo "services: shadowsocks-libev is not installed (apt-get install shadowsocks-libev)" >&2; return 1; }
    apt_install shadowsocks-libev
}

nginx_program() {
    # The WebSocket tests run nginx as a TLS-terminating reverse proxy in
    # front of a ws listener, from a config of their own on a loopback
    # port.  Debian's package would start its own nginx on port 80 at
    # install; a policy-rc.d refusing service starts keeps that from
    # happening (and is removed again unless one was there before).
    command -v nginx >/dev/null 2>&1 && return 0
    [ -x /usr/sbin/nginx ] && return 0
    can_install || { echo "services: nginx is not installed (apt-get install nginx-light)" >&2; return 1; }
    local policy=/usr/sbin/policy-rc.d own=0
    if [ ! -e "$policy" ]; then
        printf '#!/bin/sh\nexit 101\n' > "$policy" && chmod 755 "$policy" && own=1
    fi
    apt_install nginx-light
    local status=$?
    [ "$own" = 1 ] && rm -f "$policy"
    return $status
}

chromium_programs() {
    # The admin panel's browser test runs Debian's headless Chromium through
    # its chromium-driver (selenium, a test dependency, drives it).
    command -v chromium >/dev/null 2>&1 && command -v chromedriver >/dev/null 2>&1 && return 0
    can_install || { echo "services: chromium is not installed (apt-get install chromium chromium-driver)" >&2; return 1; }
    apt_install chromium chromium-driver
}

postgres
mariadb
haproxy_program
shadowsocks_programs
nginx_program
chromium_programs
exit 0
