# The two commands a newcomer needs: `make demo` and `make test`.
SHELL := /bin/bash
PORT ?= 8188
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: provision provision-browser serve test test-slow lint demo screenshot clean

provision:
	@bash scripts/provision.sh

serve: provision
	cd .comfyui && ../$(PY) main.py --cpu --listen 127.0.0.1 --port $(PORT) --disable-auto-launch

lint: provision
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

# Chromium from the distribution's packages, for the browser test (tests/test_browser.py).
provision-browser:
	@bash scripts/provision_browser.sh

test: provision provision-browser lint
	$(PY) -m pytest -m "not slow"

# Re-take the README's screenshot of the sanitize workflow in the real frontend.
screenshot: provision provision-browser
	BACKDOOR_SEAL_SCREENSHOT=docs/images/sanitize-workflow.png $(PY) -m pytest tests/test_browser.py

# Retrains every shipped attacked lab model from lab-clean and checks its stated ASR (about 1.5 hours).
test-slow: provision
	$(PY) -m pytest -m slow

demo: provision
	$(PY) -m backdoor_seal.core.cli demo

clean:
	rm -rf .venv .comfyui .cache out out-*
