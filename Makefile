# The README's commands.  Everything installs into .venv; state for the demo
# lives in .state (both ignored by git).
PYTHON ?= python3
VENV ?= .venv
STATE ?= .state
PY := $(VENV)/bin/python
DEMO_PORT ?= 8443

.PHONY: run test venv clean

$(VENV)/.installed: setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# compat mode puts the checkout on sys.path, so twistd finds
	# twisted/plugins/ here and code changes need no reinstall.
	$(PY) -m pip install --quiet -e '.[test]' --config-settings editable_mode=compat
	touch $@

venv: $(VENV)/.installed

test: venv
	$(PY) -m pytest -q -ra

run: venv
	@mkdir -p $(STATE)
	@test -f $(STATE)/server.crt || $(VENV)/bin/mtopctl cert init --host localhost --ip 127.0.0.1 --dir $(STATE) >/dev/null
	@test -f $(STATE)/mtop.yaml || printf '%s\n' \
		'# Demo configuration written by make run.' \
		'server:' \
		'  type: tls' \
		'  listen: "127.0.0.1:$(DEMO_PORT)"' \
		'  crt: server.crt' \
		'  key: server.key' \
		'  proto: mtop' \
		'log:' \
		'  level: info' \
		'db:' \
		'  driverName: sqlite' \
		'  dsn: mtop.db' > $(STATE)/mtop.yaml
	@$(VENV)/bin/mtopctl -c $(STATE)/mtop.yaml db init >/dev/null
	@test -f $(STATE)/demo-password || { umask 077; $(PY) -c 'import secrets; print(secrets.token_urlsafe(12))' > $(STATE)/demo-password; }
	@$(VENV)/bin/mtopctl -c $(STATE)/mtop.yaml user del -u demo >/dev/null 2>&1 || true
	@$(VENV)/bin/mtopctl -c $(STATE)/mtop.yaml user add -u demo --password-stdin < $(STATE)/demo-password >/dev/null
	@echo "MTop demo server on 127.0.0.1:$(DEMO_PORT) (TLS 1.3, ALPN mtop), user 'demo'."
	@echo "Share link: $$($(VENV)/bin/mtopctl url -u demo -H 127.0.0.1 -P $(DEMO_PORT) --password-stdin < $(STATE)/demo-password)"
	@echo "Try it from another terminal (opens a tunnel to the server's own port):"
	@echo "  $(VENV)/bin/mtopctl check --ca $(STATE)/ca.crt --target 127.0.0.1:$(DEMO_PORT) \"\$$(cat $(STATE)/demo-link)\""
	@$(VENV)/bin/mtopctl url -u demo -H 127.0.0.1 -P $(DEMO_PORT) --password-stdin < $(STATE)/demo-password > $(STATE)/demo-link
	@echo "Stop with Ctrl-C."
	exec $(VENV)/bin/twistd --nodaemon --pidfile= mtop --config $(STATE)/mtop.yaml

clean:
	rm -rf $(VENV) $(STATE) build *.egg-info twisted/plugins/dropin.cache
