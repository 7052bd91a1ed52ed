# Two commands on a fresh machine (each installs what it needs into .venv):
#   make demo   - the tour: fine-tune + serve a mixed batch of adapters, on CPU or GPU
#   make test   - builds the CUDA extension (nvcc, no GPU needed) and runs the test suite
PY ?= python3
VENV ?= .venv
VPY := $(VENV)/bin/python
export CUDA_HOME ?= /usr/local/cuda
export MAX_JOBS ?= 2
PYTEST_ARGS ?=

.PHONY: demo test ext install engines bench-quick clean

$(VENV)/.installed: pyproject.toml setup.py
	test -x $(VPY) || $(PY) -m venv $(VENV)
	# torch resolves to the machine's local wheel (pip is capped at torch<=2.14.1 there)
	$(VPY) -m pip install -q torch triton numpy setuptools wheel ninja
	# CUTLASS headers for the sm90 fused GEMM: a build-time dependency only (setup.py finds
	# cutlass_library/source/include on disk; nothing imports it at run time)
	$(VPY) -m pip install -q --no-deps nvidia-cutlass==4.2.0.0
	$(VPY) -m pip install -q pytest hypothesis pytest-benchmark "peft>=0.13" "transformers>=4.45" \
		"bitsandbytes==0.50.2" \
		safetensors matplotlib tqdm
	LORA_KERNELS_SKIP_CUDA_BUILD=1 $(VPY) -m pip install -q --no-deps --no-build-isolation -e .
	touch $@

install: $(VENV)/.installed

# SGLang / vLLM LoRA modules for tests/test_engines.py, all --no-deps so
# torch stays as installed (tests/engine_env.py; ~70 s and ~290 MB on the 2-core CI box).
$(VENV)/.engines: $(VENV)/.installed tests/engine_env.py
	$(VPY) tests/engine_env.py sglang vllm
	touch $@

engines: $(VENV)/.engines

# The extension builds in place and reuses build/ (ninja rebuilds only what changed).
ext: install
	@if [ -x "$(CUDA_HOME)/bin/nvcc" ]; then \
		$(VPY) setup.py -q build_ext --inplace; \
	else echo "nvcc not found under CUDA_HOME=$(CUDA_HOME): skipping the CUDA extension"; fi

test: ext engines
	$(VPY) -m pytest -q $(PYTEST_ARGS)

demo: install
	$(VPY) -m lora_kernels.cli demo

bench-quick: install
	$(VPY) -m lora_kernels.cli bench --quick

clean:
	rm -rf build lora_kernels/_C*.so
