# The README's commands.  Everything installs into .venv; state for the demo
# lives in .state (both ignored by git).
PYTHON ?= python3
VENV ?= .venv
STATE ?= .state
PY := $(VENV)/bin/python
DEMO_PORT ?= 8443
DEMO_SOCKS ?= 1080
DEMO_HTTP ?= 8080
DEMO_WEB ?= 8000
# make fuzz: minutes in all, and the share of them spent in the atheris
# harness (when atheris installs; the hypothesis properties otherwise).
FUZZ_MINUTES ?= 10
FUZZ_ATHERIS ?= 0.3

.PHONY: run test test-portable fuzz bench venv clean deb deb-test

$(VENV)/.installed: setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# compat mode puts the checkout on sys.path, so twistd finds
	# twisted/plugins/ here and code changes need no reinstall.
	$(PY) -m pip install --quiet -e '.[test]' --config-settings editable_mode=compat
	touch $@

venv: $(VENV)/.installed

# PostgreSQL and MariaDB on 127.0.0.1 are part of the suite: started (or, on
# a fresh Debian machine as root, installed) by tests/services.sh.
test: venv
	@bash tests/services.sh
	$(PY) -m pytest -q -ra

# The suite again on the portable data path: public pyOpenSSL and Twisted
# APIs only, as when the fast path (mtop/fastpath.py, private internals) is
# switched off or a library upgrade lacks a piece of it.
test-portable: venv
	@bash tests/services.sh
	MTOP_FASTPATH=off $(PY) -m pytest -q -ra

# The long fuzz run of every parser (tests/fuzz/run.py); not part of make test,
# which runs the same properties with few examples.
fuzz: venv
	@$(PY) -c 'import atheris' 2>/dev/null || $(PY) -m pip install --quiet atheris \
		|| echo "atheris did not install: hypothesis properties only"
	$(PY) tests/fuzz/run.py --minutes $(FUZZ_MINUTES) --atheris $(FUZZ_ATHERIS)

# Benchmarks (never part of make test): ratios to a direct baseline measured
# in the same run; see bench/run.py.  BENCH_ARGS='--only tls-* --repeat 5'.
BENCH_OUT ?= bench/results
BENCH_ARGS ?=
bench: venv
	@mkdir -p $(BENCH_OUT)
	$(PY) -m bench --json $(BENCH_OUT)/results.json $(BENCH_ARGS)

# The demo.  mtop/demo.py runs the web page, the server and climber, and
# stops all three at the first Ctrl-C or on SIGTERM to make (which make
# passes on to its recipe: exec keeps the supervisor make's own child).
run: venv
	@mkdir -p $(STATE)
	@test -f $(STATE)/server.crt || $(VENV)/bin/mtopctl cert init --host localhost --ip 127.0.0.1 --dir $(STATE) >/dev/null
	@printf '%s\n' \
		'# Demo configuration written by make run.' \
		'server:' \
		'  type: tls' \
		'  listen: "127.0.0.1:$(DEMO_PORT)"' \
		'  crt: server.crt' \
		'  key: server.key' \
		'  proto: mtop' \
		'listeners:' \
		'  - type: tls' \
		'  - type: quic' \
		'log:' \
		'  level: info' \
		'# The demo page is on loopback, which tunnels may not reach by default.' \
		'acl:' \
		'  allow: ["127.0.0.0/8", "::1/128"]' \
		'db:' \
		'  driverName: sqlite' \
		'  dsn: mtop.db' > $(STATE)/mtop.yaml
	@$(VENV)/bin/mtopctl -c $(STATE)/mtop.yaml db init >/dev/null
	@test -f $(STATE)/demo-password || { umask 077; $(PY) -c 'import secrets; print(secrets.token_urlsafe(12))' > $(STATE)/demo-password; }
	@$(VENV)/bin/mtopctl -c $(STATE)/mtop.yaml user del -u demo >/dev/null 2>&1 || true
	@$(VENV)/bin/mtopctl -c $(STATE)/mtop.yaml user add -u demo --password-stdin < $(STATE)/demo-password >/dev/null
	@$(VENV)/bin/mtopctl url -u demo -H 127.0.0.1 -P $(DEMO_PORT) --password-stdin < $(STATE)/demo-password > $(STATE)/demo-link
	@$(VENV)/bin/mtopctl url -u demo -H 127.0.0.1 -P $(DEMO_PORT) -t quic --password-stdin < $(STATE)/demo-password > $(STATE)/demo-link-quic
	@printf '%s\n' \
		'# Demo climber configuration written by make run.' \
		'socks5:' \
		'  listen: "127.0.0.1:$(DEMO_SOCKS)"' \
		'http:' \
		'  listen: "127.0.0.1:$(DEMO_HTTP)"' \
		'strategy: failover' \
		'servers:' \
		"  - url: \"$$(cat $(STATE)/demo-link-quic)\"" \
		'    ca: ca.crt' \
		"  - url: \"$$(cat $(STATE)/demo-link)\"" \
		'    ca: ca.crt' > $(STATE)/climber.yaml
	@mkdir -p $(STATE)/www && echo '<h1>Hello through MTop</h1>' > $(STATE)/www/index.html
	@echo "MTop demo: server on 127.0.0.1:$(DEMO_PORT) (TLS 1.3 on TCP and QUIC on UDP, ALPN mtop, user 'demo'),"
	@echo "climber (QUIC first, TLS as failover) SOCKS5 proxy on 127.0.0.1:$(DEMO_SOCKS), HTTP proxy on 127.0.0.1:$(DEMO_HTTP),"
	@echo "and a web page on 127.0.0.1:$(DEMO_WEB).  From another terminal:"
	@echo "  curl --socks5-hostname 127.0.0.1:$(DEMO_SOCKS) http://127.0.0.1:$(DEMO_WEB)/"
	@echo "  curl -x http://127.0.0.1:$(DEMO_HTTP) http://127.0.0.1:$(DEMO_WEB)/"
	@echo "  $(VENV)/bin/mtopctl check --ca $(STATE)/ca.crt --target 127.0.0.1:$(DEMO_WEB) \"\$$(cat $(STATE)/demo-link)\""
	@echo "Share link (contains the password): $(STATE)/demo-link.  Stop with Ctrl-C."
	@exec $(PY) -m mtop.demo --state $(STATE) --web-port $(DEMO_WEB) --twistd $(VENV)/bin/twistd

# Debian packages mtop and climber (see README, "Debian packages"): built
# with dpkg-buildpackage from a copy of the tree in $(DEB_DIR)/src, so the
# .debs land in $(DEB_DIR) (ignored by git), then checked with lintian
# (errors fail the build).  Build dependencies are installed when missing
# (as root, with apt-get).
DEB_DIR ?= build/deb

deb:
	@bash debian/build-deps.sh
	rm -rf $(DEB_DIR) && mkdir -p $(DEB_DIR)/src
	tar -cf - --exclude=./build --exclude=./.venv --exclude=./.state --exclude=./.git \
		--exclude='*.egg-info' --exclude=__pycache__ --exclude=dropin.cache . | tar -xf - -C $(DEB_DIR)/src
	cd $(DEB_DIR)/src && dpkg-buildpackage -us -uc -b
	lintian --fail-on error --info $(DEB_DIR)/*.changes
	@ls -l $(DEB_DIR)/*.deb

# The packages installed with apt into a throwaway Debian 12 root
# (debootstrap) and run from their installed files: mtopctl cert init, db
# init, user add, mtop.service's command (TLS and QUIC, text and JSON logs)
# with a tunnel, climber through it, purge (debian/tests/chroot).
deb-test: deb
	bash debian/tests/chroot $(DEB_DIR)

clean:
	rm -rf $(VENV) $(STATE) build *.egg-info twisted/plugins/dropin.cache
