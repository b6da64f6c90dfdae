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

.PHONY: run test fuzz venv clean

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

# The long fuzz run of every parser (tests/fuzz/run.py); not part of make test,
# which runs the same properties with few examples.
fuzz: venv
	@$(PY) -c 'import atheris' 2>/dev/null || $(PY) -m pip install --quiet atheris \
		|| echo "atheris did not install: hypothesis properties only"
	$(PY) tests/fuzz/run.py --minutes $(FUZZ_MINUTES) --atheris $(FUZZ_ATHERIS)

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
	@trap 'kill $$(jobs -p) 2>/dev/null; wait' EXIT INT TERM; \
	$(PY) -m http.server --bind 127.0.0.1 --directory $(STATE)/www $(DEMO_WEB) >/dev/null 2>&1 & \
	$(VENV)/bin/twistd --nodaemon --pidfile= -r asyncio mtop --config $(STATE)/mtop.yaml & \
	$(VENV)/bin/twistd --nodaemon --pidfile= -r asyncio climber --config $(STATE)/climber.yaml

clean:
	rm -rf $(VENV) $(STATE) build *.egg-info twisted/plugins/dropin.cache
