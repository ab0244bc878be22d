SHELL := /bin/bash
# The README's quick start is `make run` and `make test`; both work on a fresh Debian machine with Python 3.11+.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
CONFIG ?= etc/dcrouter.example.toml
TESTS  ?= tests

.PHONY: run test check fuzz bench bench-relay bench-processing bench-proxy lint clean venv test-peers

# Debian splits venv support out of python3; install it when it is missing and we may.
$(BIN)/python:
	@$(PYTHON) -c 'import ensurepip, venv' 2>/dev/null || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    apt-get install -y -q python3-venv >/dev/null; \
	  else echo "dcrouter: install python3-venv (apt-get install python3-venv)" >&2; exit 1; fi; }
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

# A stamp per install flavour, redone when the metadata or the package changes.
$(VENV)/.installed-run: $(BIN)/python pyproject.toml $(shell find dcrouter twisted -name '*.py')
	$(BIN)/python -m pip install -q .
	touch $@

$(VENV)/.installed-test: $(BIN)/python pyproject.toml $(shell find dcrouter twisted -name '*.py')
	$(BIN)/python -m pip install -q '.[test]'
	touch $@ $(VENV)/.installed-run

venv: $(VENV)/.installed-test

run: $(VENV)/.installed-run
	$(BIN)/twistd -n dcrouter --config $(CONFIG)

check: $(VENV)/.installed-run
	$(BIN)/twistd -n dcrouter --config $(CONFIG) --check

# Real peers the tests start themselves (never the machine's shared services): redis-server for the Redis queue,
# Debian's pebble ACME test server, Perl's Mail::DKIM as an independent DKIM verifier, the content scanning
# daemons spamd (SpamAssassin), clamd (ClamAV) and rspamd, and the TLS scanners sslscan and testssl.sh (they
# check the TLS policy on real listeners), and OpenLDAP's slapd for LDAP authentication. Installed when missing
# and we may (root with apt-get); otherwise the tests that need one are skipped and say what to install.
test-peers:
	@missing=""; \
	command -v redis-server >/dev/null || missing="$$missing redis-server"; \
	command -v redis-sentinel >/dev/null || missing="$$missing redis-sentinel"; \
	command -v pebble >/dev/null || [ -x /usr/bin/pebble ] || missing="$$missing pebble"; \
	perl -MMail::DKIM::Verifier -e 1 2>/dev/null || missing="$$missing libmail-dkim-perl"; \
	command -v spamd >/dev/null || [ -x /usr/sbin/spamd ] || missing="$$missing spamd spamassassin"; \
	command -v clamd >/dev/null || [ -x /usr/sbin/clamd ] || missing="$$missing clamav-daemon"; \
	command -v rspamd >/dev/null || [ -x /usr/bin/rspamd ] || missing="$$missing rspamd"; \
	command -v sslscan >/dev/null || missing="$$missing sslscan"; \
	command -v haproxy >/dev/null || [ -x /usr/sbin/haproxy ] || missing="$$missing haproxy"; \
	command -v h2load >/dev/null || missing="$$missing nghttp2-client"; \
	command -v testssl >/dev/null || missing="$$missing testssl.sh"; \
	command -v chromium >/dev/null || missing="$$missing chromium"; \
	command -v chromedriver >/dev/null || missing="$$missing chromium-driver"; \
	command -v dig >/dev/null || missing="$$missing bind9-dnsutils"; \
	command -v slapd >/dev/null || [ -x /usr/sbin/slapd ] || missing="$$missing slapd"; \
	[ -z "$$missing" ] || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    export DEBIAN_FRONTEND=noninteractive; \
	    apt-get install -y -q $$missing >/dev/null 2>&1 \
	      || { apt-get update -q >/dev/null && apt-get install -y -q $$missing >/dev/null; }; \
	  else echo "dcrouter: missing$$missing: the tests that need them will be skipped" >&2; fi; }

# Trial runs from the checkout (the source tree comes first on sys.path); tests that start a real twistd
# put the checkout on PYTHONPATH, so Twisted finds twisted/plugins/dcrouter_plugin.py there.
test: $(VENV)/.installed-test test-peers
	@set -o pipefail; $(BIN)/python -m twisted.trial --temp-directory=_trial_temp $(TESTS) 2>&1 \
	  | tee _trial_temp.log; rc=$$?; \
	  $(BIN)/python .ci/trial_summary.py _trial_temp.log; exit $$rc

# The fuzz tests with the long Hypothesis profile (tests/fuzzing.py): FUZZ_EXAMPLES per parser at weight 1,
# about 10^6 examples in all at the default (docs/fuzzing.md: figures, and how to replay a failure). Each
# module runs on its own, its time printed; a failure does not stop the others, and fails the target.
FUZZ_EXAMPLES ?= 75000
FUZZ_TESTS ?= tests.test_fuzz_proxy_parsers tests.test_fuzz_proxy_http tests.test_fuzz_smtp tests.test_fuzz_mime \
	tests.test_fuzz_config

fuzz: $(VENV)/.installed-test
	@failed=""; for t in $(FUZZ_TESTS); do \
	  start=$$(date +%s); \
	  HYPOTHESIS_PROFILE=fuzz HYPOTHESIS_FUZZ_EXAMPLES=$(FUZZ_EXAMPLES) \
	    $(BIN)/python -m twisted.trial --temp-directory=_trial_temp.fuzz $$t || failed="$$failed $$t"; \
	  echo "fuzz: $$t: $$(( $$(date +%s) - start )) s at FUZZ_EXAMPLES=$(FUZZ_EXAMPLES)"; \
	done; \
	[ -z "$$failed" ] || { echo "fuzz: failed:$$failed" >&2; exit 1; }

bench: $(VENV)/.installed-test
	$(BIN)/python -m bench.ingress

# End-to-end relaying next to Postfix; needs Debian's postfix package (see docs/performance.md).
bench-relay: $(VENV)/.installed-test test-peers
	$(BIN)/python -m bench.relay

bench-processing: $(VENV)/.installed-test
	$(BIN)/python -m bench.processing

bench-proxy: $(VENV)/.installed-test
	$(BIN)/python -m bench.proxy
	$(BIN)/python -m bench.proxy_http

lint: $(VENV)/.installed-test
	$(BIN)/python -m pip install -q '.[dev]'
	$(BIN)/ruff check dcrouter tests bench twisted
	$(BIN)/mypy dcrouter
	$(BIN)/lint-imports

clean:
	rm -rf $(VENV) _trial_temp* build *.egg-info
