# The two commands a newcomer needs: `make demo` and `make test`.
SHELL := /bin/bash
PORT ?= 8188
VENV := .venv
PY := $(VENV)/bin/python
# HOST=0.8.0 runs serve / demo on the second host (scripts/provision.sh copies it when its tree exists)
HOST ?= 0.3.75
COMFY_DIR := $(if $(filter 0.3.75,$(HOST)),.comfyui,.comfyui-$(HOST))

.PHONY: provision provision-browser host serve test test-slow lint demo screenshot clean

provision:
	@bash scripts/provision.sh

serve: provision host
	cd $(COMFY_DIR) && PYTHONPATH=$$PWD/.seal-deps ../$(PY) main.py --cpu --listen 127.0.0.1 --port $(PORT) --disable-auto-launch

host:
	@test -f $(COMFY_DIR)/main.py || { echo "HOST=$(HOST): no ComfyUI at $(COMFY_DIR) (hosts: 0.3.75, and 0.8.0 when ../shared/comfyui-0.8.0 exists; run make provision)"; exit 2; }

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

demo: provision host
	COMFYUI_PATH=$(COMFY_DIR) $(PY) -m backdoor_seal.core.cli demo

clean:
	rm -rf .venv .comfyui .comfyui-0.8.0 .cache out out-*
