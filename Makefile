# make demo   : set up, build, train a small CNN on bundled digits and compare every method
#               (accuracy before/after fine-tuning, size, latency), then compress, verify, export to
#               ONNX (checked in onnxruntime), benchmark
# make test   : set up, build, run the whole test suite
# Set-up is a virtual environment in .venv with torch from TORCH_SPEC; the
# extension builds with CUDA when torch is a CUDA build and nvcc is found (or
# FORCE_CUDA=1), for TORCH_CUDA_ARCH_LIST (default 8.0;8.6;9.0 without a GPU).

PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
MAX_JOBS ?= 2
PY := $(VENV)/bin/python
PYTEST_ARGS ?=
NO_EXT_SKIP_OPCHECK := cp tucker2 tt kcp ht2 tt_tucker

.PHONY: all setup build test demo bench clean

all: test

$(VENV)/.deps: requirements-dev.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet $(TORCH_SPEC)
	$(PY) -m pip install --quiet -r requirements-dev.txt
	touch $@

setup: $(VENV)/.deps

build: setup
	MAX_JOBS=$(MAX_JOBS) $(PY) -m pip install --quiet --no-build-isolation --no-deps -e .
	$(PY) -m hsvkernels info

test: build
	$(PY) -m pytest -q tests $(PYTEST_ARGS)
	# the op matrix again on the pure-PyTorch fallback (what users get when _C is missing). opcheck runs for
	# two methods only: the fallback registers one op for all of them, and opcheck through the reference
	# path costs ~20 s a method (the first run above opchecks every method)
	HSV_NO_EXTENSION=1 $(PY) -m pytest -q -p no:cacheprovider tests/test_op.py tests/test_autograd.py tests/test_errors.py \
		tests/test_epilogue_op.py tests/test_epilogue_fusion.py \
		"tests/test_export.py::test_exported_program_has_only_standard_ops[hsv-nchw]" \
		"tests/test_export.py::test_exported_program_has_only_standard_ops[kcp-channels_last]" \
		$(foreach k,$(NO_EXT_SKIP_OPCHECK),--deselect "tests/test_autograd.py::test_opcheck[$(k)]" \
			--deselect "tests/test_epilogue_op.py::test_epilogue_opcheck[$(k)]")

demo: build
	$(PY) -m hsvkernels demo
	$(PY) -m hsvkernels compress torchvision:resnet18 --method svd --ratio 4 --input-size 224 --verify \
		--out build/demo-resnet18
	$(PY) -m hsvkernels export build/demo-resnet18 --onnx build/demo-resnet18.onnx --verify
	$(PY) bench/layers.py --quick --methods svd

bench: build
	$(PY) bench/layers.py

clean:
	rm -rf build *.egg-info hsvkernels/_C*.so
