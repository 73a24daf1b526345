# The two commands a newcomer needs: `make demo` and `make test`.
SHELL := /bin/bash
PORT ?= 8188
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: provision serve test test-slow lint demo clean

provision:
	@bash scripts/provision.sh

serve: provision
	cd .comfyui && ../$(PY) main.py --cpu --listen 127.0.0.1 --port $(PORT) --disable-auto-launch

lint: provision
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

test: provision lint
	$(PY) -m pytest -m "not slow"

# Retrains every shipped attacked lab model from lab-clean and checks its stated ASR (about 1.5 hours).
test-slow: provision
	$(PY) -m pytest -m slow

demo: provision
	$(PY) -m backdoor_seal.core.cli demo

clean:
	rm -rf .venv .comfyui .cache out
