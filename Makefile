# camserve: set-up, export, serve, explain, benchmark, tests.
PYTHON_BIN ?= python3.11
VENV       := .venv
PY         := $(VENV)/bin/python
# The default model is real offline: EfficientNet-Lite0 with the ImageNet weights its pinned package ships.
# The classic Keras ImageNet models: BACKBONE=resnet50 WEIGHTS=imagenet (or vgg16; downloads once into ~/.keras).
BACKBONE   ?= efficientnet_lite0
MODEL      ?= $(BACKBONE)_cam
WEIGHTS    ?= auto
METHODS    ?= gradcam,cam
BASE_PATH  ?= models
PORT       ?= 8500
REST_PORT  ?= 8501
# glibc malloc arenas of the servers these targets start: 2 instead of 8 per core keeps the
# embedded server's RSS ~100 MB lower and flat under load (docs/OPERATIONS.md "Memory").
MALLOC_ARENA_MAX ?= 2
serve demo evaluate bench web: export MALLOC_ARENA_MAX := $(MALLOC_ARENA_MAX)
# The embedded server of serve, demo and bench runs serving/batching.config and session.config when
# TensorFlow sees a GPU (asked only where nvidia-smi exists: serving/gpu.py), else batching_cpu.config
# and session_cpu.config (the graph optimizer's settings); BATCHING= turns batching off.
GPU        := $(shell command -v nvidia-smi >/dev/null 2>&1 && $(PY) -m serving.gpu >/dev/null 2>&1 && echo gpu)
BATCHING   ?= serving/batching$(if $(GPU),,_cpu).config
SESSION_CONFIG ?= serving/session$(if $(GPU),,_cpu).config
HOST       ?= 127.0.0.1
# The embedded server in the background of a recipe's shell, stopped when that shell ends or is interrupted.
WITH_EMBEDDED = $(EMBEDDED) & server=$$!; trap 'kill $$server 2>/dev/null; wait $$server' EXIT INT TERM;
EMBEDDED    = $(PY) -m serving --port $(PORT) --rest_api_port $(REST_PORT) --host $(HOST) --model_name $(MODEL) \
	--model_base_path $(BASE_PATH)/$(MODEL) --monitoring_config_file serving/monitoring.config \
	--tensorflow_session_config_file $(SESSION_CONFIG) \
	$(if $(BATCHING),--enable_batching --batching_parameters_file $(BATCHING))

.PHONY: venv test test-quick lint certs export explain demo evaluate bench cold-start web gpu-check clean

# The virtual environment is rebuilt whenever requirements.txt or pyproject.toml changes. The repository
# itself is installed in editable mode: the rooms import each other as camserve.<room> (pyproject.toml).
$(VENV)/.installed: requirements.txt pyproject.toml
	@command -v $(PYTHON_BIN) >/dev/null || { echo "$(PYTHON_BIN) not found: install Python 3.11"; exit 1; }
	test -x $(PY) || $(PYTHON_BIN) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt
	PYTHONWARNINGS=ignore $(PY) -m pip install --quiet --no-deps --no-build-isolation --editable .
	touch $@

venv: $(VENV)/.installed

# One pytest process per core, at most 4 (each holds TensorFlow and its models: ~1-2 GB); a test file
# runs whole in one of them. TEST_WORKERS=0: everything in one process.
TEST_WORKERS ?= $(shell n=$$(nproc 2>/dev/null || echo 1); [ $$n -gt 4 ] && n=4; echo $$n)
test: venv
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile --durations=15 -m "not load" tests

# The edit loop: the suite without the tests that export a real backbone (the `real` marker:
# tests/conftest.py) and without those marked `slow` (pytest.ini says which). CI runs `make test`.
test-quick: venv
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile --durations=10 -m "not load and not real and not slow" tests

# ruff (pinned in requirements.txt, configured in pyproject.toml): pyflakes, import order, 120 columns.
lint: venv
	$(PY) -m ruff check .

# A test CA, server and client certificates and the servers' ssl.config in certs/ (python -m serving.certs).
certs: venv
	$(PY) -m serving.certs certs

# The load test (tests/test_load.py): 32 callers for LOAD_SECONDS of mixed valid and hostile requests.
LOAD_SECONDS ?= 60
.PHONY: test-load
test-load: venv
	LOAD_SECONDS=$(LOAD_SECONDS) $(PY) -m pytest -q -s -m load tests/test_load.py

# METHODS=all exports every method; TARGET_LAYERS=a,b adds <method>_fused signatures (fused maps of those layers);
# SMOOTH=aug, eigen or aug,eigen adds <method>_smooth signatures (which make bench then times too).
TARGET_LAYERS ?=
SMOOTH ?=
export: venv
	$(PY) -m export --backbone $(BACKBONE) --weights $(WEIGHTS) --methods $(METHODS) \
		--model-name $(MODEL) --base-path $(BASE_PATH) $(if $(TARGET_LAYERS),--target-layers $(TARGET_LAYERS)) \
		$(if $(SMOOTH),--smooth $(SMOOTH))

# Needs a running server (make serve, or TF Serving) with $(MODEL) on port $(PORT).
explain: venv
	$(PY) -m client explain samples/*.png samples/*.jpg --server localhost:$(PORT) --model $(MODEL) --out out

# Everything from a fresh clone, offline: venv, export EfficientNet-Lite0 with its packaged ImageNet
# weights (BACKBONE=resnet50: Keras' ImageNet weights when cached or downloadable, WEIGHTS=path for a
# local file, else random with a one-line warning), serve it in the background, explain the sample
# photos into out/, stop the server.
demo: venv
	@test -n "$$(ls $(BASE_PATH)/$(MODEL) 2>/dev/null)" || $(MAKE) --no-print-directory export
	@$(WITH_EMBEDDED) \
	$(PY) -m client wait --server localhost:$(PORT) --model $(MODEL) --timeout 300 && \
	$(PY) -m client explain samples/*.png samples/*.jpg --server localhost:$(PORT) --model $(MODEL) \
		--method gradcam --out out && \
	$(PY) -m client explain samples/*.png samples/*.jpg --server localhost:$(PORT) --model $(MODEL) \
		--method cam --out out

# The faithfulness table (docs/BENCHMARKS.md): deletion/insertion AUC and the drop at 20 % of every
# method against a random map, on every sample photo, from a model exported with every method
# ($(BACKBONE)_all, exported first if missing) served by the embedded server started here.
evaluate: MODEL = $(BACKBONE)_all
evaluate: venv
	@test -n "$$(ls $(BASE_PATH)/$(MODEL) 2>/dev/null)" || $(MAKE) --no-print-directory export METHODS=all MODEL=$(MODEL)
	@$(WITH_EMBEDDED) \
	$(PY) -m client wait --server localhost:$(PORT) --model $(MODEL) --timeout 600 && \
	$(PY) -m client evaluate samples/ --server localhost:$(PORT) --model $(MODEL) --methods all --per-image

# Latency benchmark against SERVER (default: starts the embedded server on the exported model
# itself); BENCH_ARGS passes more flags (python -m bench --help). Figures: bench/results.json.
SERVER     ?=
bench: venv
	@test -n "$$(ls $(BASE_PATH)/$(MODEL) 2>/dev/null)" || $(MAKE) --no-print-directory export
	@if [ -n "$(SERVER)" ]; then \
		$(PY) -m bench --server $(SERVER) --model $(MODEL) --model-dir $(BASE_PATH)/$(MODEL) --backbone $(BACKBONE) --weights $(WEIGHTS) \
			$(BENCH_ARGS); \
	else \
		$(WITH_EMBEDDED) \
		$(PY) -m bench --server localhost:$(PORT) --rest localhost:$(REST_PORT) --model $(MODEL) --weights $(WEIGHTS) \
			--model-dir $(BASE_PATH)/$(MODEL) --backbone $(BACKBONE) $(BENCH_ARGS); \
	fi

# A new version's costs (bench/cold_start.py): $(BACKBONE) exported with $(METHODS) and as a plain classifier,
# each timed; their time to ready on TF Serving's path side by side (LoadSavedModel + the warm-up), under
# TensorFlow's defaults and serving/session.config; a fresh server's first call of each call the client
# makes vs the next ones. Figures: bench/cold_start.json. METHODS=all: every method.
cold-start: venv
	$(PY) -m bench.cold_start --backbone $(BACKBONE) --weights $(WEIGHTS) --methods $(METHODS) --model $(MODEL) \
		$(COLD_START_ARGS)

# The explain page (python -m client web) on http://127.0.0.1:$(WEB_PORT)/, against SERVER when given
# (any TF Serving that hosts the model), else against the embedded server started here on the
# exported model. Ctrl-C stops both.
WEB_PORT   ?= 8080
web: venv
	@if [ -n "$(SERVER)" ]; then \
		$(PY) -m client web --server $(SERVER) --model $(MODEL) --port $(WEB_PORT); \
	else \
		test -n "$$(ls $(BASE_PATH)/$(MODEL) 2>/dev/null)" || $(MAKE) --no-print-directory export; \
		$(WITH_EMBEDDED) \
		$(PY) -m client wait --server localhost:$(PORT) --model $(MODEL) --timeout 300 && \
		$(PY) -m client web --server localhost:$(PORT) --model $(MODEL) --port $(WEB_PORT); \
	fi

# On a GPU machine (install tensorflow[and-cuda]==2.21.0 there first): through TF Serving's loader,
# the device of every explain-path op, and predict vs gradcam at batch 1/8/64 in float32, bfloat16
# and float16, with and without XLA (bench/gpu_check.json, .png). GPU_CHECK_ARGS="--short --backbone
# m.keras" is the small run the tests make on a CPU.
GPU_CHECK_ARGS ?=
gpu-check: venv
	$(PY) -m bench.gpu_check --out bench $(GPU_CHECK_ARGS)

clean:
	rm -rf $(BASE_PATH) out certs .pytest_cache

# --- serving ---------------------------------------------------------------------------------
DRY_RUN    ?=

.PHONY: serve serve-tfserving

# TF Serving when tensorflow_model_server is on PATH, else the embedded server (same gRPC API) on
# $(BASE_PATH)/$(MODEL), port $(PORT). DRY_RUN=1 prints the command instead of running it.
serve: venv
	@if command -v tensorflow_model_server >/dev/null; then \
		$(MAKE) --no-print-directory serve-tfserving; \
	else \
		$(if $(DRY_RUN),echo) $(EMBEDDED); \
	fi

# The real TF Serving with serving/models.config, batching.config and monitoring.config: the
# binary if on PATH, else the tensorflow/serving GPU image with Docker ($(BASE_PATH) at /models).
serve-tfserving: venv
	$(PY) -m serving.tfserving --base-path $(BASE_PATH) --port $(PORT) $(if $(DRY_RUN),--dry-run)

# --- deployment (see docs/DEPLOYING.md) --------------------------------------------------------------
IMAGE      ?= camserve:latest
TF_SERVING_VERSION ?=

.PHONY: image

# The TF Serving GPU image with $(BASE_PATH)/$(MODEL) and serving/*.config baked in (serving/Dockerfile;
# needs Docker). MODEL must be the model serving/models.config serves; BASE_PATH must lie inside the
# repository (the build context). TF_SERVING_VERSION=2.20.0 picks another base image. DRY_RUN=1
# prints the command.
image:
	@grep -q 'name: "$(MODEL)"' serving/models.config || \
		{ echo "serving/models.config does not serve $(MODEL): add it there first" >&2; exit 1; }
	@$(if $(DRY_RUN),true,test -n "$$(ls $(BASE_PATH)/$(MODEL) 2>/dev/null)" || $(MAKE) --no-print-directory export)
	$(if $(DRY_RUN),@echo )docker build -f serving/Dockerfile -t $(IMAGE) --build-arg MODEL_NAME=$(MODEL) \
		--build-arg MODEL_DIR=$(BASE_PATH)/$(MODEL) \
		$(if $(TF_SERVING_VERSION),--build-arg TF_SERVING_VERSION=$(TF_SERVING_VERSION) ).
