# Set-up is automatic: the first target that needs the venv creates it.
# TORCH: the CPU wheel on this machine; on a GPU node use e.g. `make TORCH=torch test`.
VENV  ?= .venv
TORCH ?= torch==2.13.0
PY    := $(VENV)/bin/python
BIN   := $(VENV)/bin
# the offline data root beside the checkout, when there is one (else the loaders use the Hugging Face hub)
ifneq ($(wildcard ../shared/data),)
export QUANTSTUDY_DATA ?= $(abspath ../shared/data)
endif

.PHONY: venv test check-sync nbtest pytest numerics outputs smoke smoke-reference gpu-check gpu-check-tiny gpu-check-dry clean

$(VENV)/.installed: setup.py settings.ini
	test -x $(PY) || python3 -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q $(TORCH)           # torch first, so nothing pulls a CUDA build
	$(BIN)/pip install -q -e ".[dev]"
	$(PY) -m ipykernel install --sys-prefix --name python3 >/dev/null
	touch $@

venv: $(VENV)/.installed

## test: notebooks and library in sync, notebook tests, pytest, then the numerics pass
test: check-sync nbtest pytest numerics

check-sync: venv
	@before=$$(git status --porcelain -- nbs quantstudy | sha256sum; git diff -- nbs quantstudy | sha256sum); \
	$(BIN)/nbdev_clean && $(BIN)/nbdev_export; \
	after=$$(git status --porcelain -- nbs quantstudy | sha256sum; git diff -- nbs quantstudy | sha256sum); \
	if [ "$$before" != "$$after" ]; then \
	  echo "nbdev_clean/nbdev_export changed nbs/ or quantstudy/: run them and commit the result"; \
	  git status --short -- nbs quantstudy; exit 1; fi; \
	echo "nbs/ and quantstudy/ are in sync"

# notebooks that read the data root; without one they are skipped (as the tests skip), saying so
# 07_analysis and 07a-07g train a smoke run on PTB, except 07c_linear_time (random hidden states): hence 07[abd-g]?_
DATA_NBS := 03a_moments|04_data|06a_perplexity|06b_lambada|06c_tasks|06d_harness|06e_ptq|07[abd-g]?_
NBTEST   := $(BIN)/nbdev_test --timing $(if $(QUANTSTUDY_DATA),,--skip_file_re '^($(DATA_NBS))')

nbtest: venv
	@$(if $(QUANTSTUDY_DATA),,echo "QUANTSTUDY_DATA is unset: notebooks $(DATA_NBS) read data and are skipped")
	OMP_NUM_THREADS=1 $(NBTEST) --n_workers 2   # one thread per worker: 2 workers on 2 cores

pytest: venv
	$(BIN)/pytest -q tests

# The numerics pass: what compares floating-point outcomes (tests marked `numerics`, the notebooks below) again,
# under other kernels and thread counts than the first pass, so that a threshold tuned on one CPU fails here and
# not on a user's: ATen's AVX2 kernels (or none: `default`), MKL and oneDNN held to AVX2, 2 threads. The first pass
# ran with this machine's own kernels (AVX-512 where it has them), 1 thread per notebook and torch's default in pytest;
# the optimizer and quantizer tests also run on this machine's kernels with 1 thread, and on ATen's `default` kernels.
# (07c_linear_time asserts no floating-point outcome)
NUMERICS_NBS := 00_quantizers|00a_fused|01_qlinear|03_optim|03a_moments|05_train|07[abd-g]?_
FAST_NUMERICS := tests/test_optim.py tests/test_moments.py tests/test_quantizers.py tests/test_int8.py

# Each kernel set compiles its own fused kernels: torch's inductor cache does not key on ATEN_CPU_CAPABILITY, and a
# kernel compiled for AVX-512 loaded under `avx2` returns wrong values (measured: tests/test_perf_equivalence.py).
AVX2 := MKL_ENABLE_INSTRUCTIONS=AVX2 ONEDNN_MAX_CPU_ISA=AVX2 OMP_NUM_THREADS=2
ISA   = ATEN_CPU_CAPABILITY=$(1) TORCHINDUCTOR_CACHE_DIR=$(CURDIR)/build/inductor-$(1) $(AVX2)

numerics: venv
	$(call ISA,avx2) $(BIN)/pytest -q -m numerics tests
	$(call ISA,avx2) $(NBTEST) --n_workers 1 --file_re '^($(NUMERICS_NBS))'
	$(call ISA,default) $(BIN)/pytest -q -m numerics $(FAST_NUMERICS)
	OMP_NUM_THREADS=1 $(BIN)/pytest -q -m numerics $(FAST_NUMERICS)   # this CPU's own kernels, 1 thread

## outputs: execute every notebook (all but its slow and gpu cells, as nbdev_test does) and save its outputs, so that
## the committed notebooks show their figures and values; then clean them as check-sync does
outputs: venv
	OMP_NUM_THREADS=2 $(PY) tools/run_notebooks.py nbs/*.ipynb
	$(BIN)/nbdev_clean

# two runs at once, one thread each: the smoke runs are sized for 2 cores (the reference was made the same way)
SMOKE := OMP_NUM_THREADS=1 $(BIN)/quantstudy study smoke --jobs 2
# make smoke: training seeds 0..SEEDS-1 of each experiment (the reference has 3)
SEEDS ?= 1
REFERENCE_SEEDS := 3

## smoke: trains the smoke study afresh on this machine (CPU, minutes) into runs/smoke (figures in runs/figures/smoke),
## then holds every run against the committed reference's seed distribution (papermill_runs/smoke) and says whether it
## reproduced it. KERNELS=avx2 (or default) trains under the numerics pass's kernel settings instead of this CPU's own.
KERNELS ?=
smoke: venv
	$(if $(KERNELS),$(call ISA,$(KERNELS))) $(SMOKE) --seeds $(SEEDS) --runs-root runs --out runs/figures --force --reference papermill_runs

## smoke-reference: retrain the committed reference itself (papermill_runs/smoke, figures/smoke), after a change of protocol
smoke-reference: venv
	$(SMOKE) --seeds $(REFERENCE_SEEDS) --force

## gpu-check: every GPU check and figure in one run, planned for 8 minutes on one H100/H200 (benchmarks/README.md).
## It uses the machine's own python3 (torch + CUDA), not the CPU venv: nothing to install, the checkout is enough.
GPU_PY        ?= python3
GPU_CHECK_OUT ?= gpu_check_out
gpu-check:
	mkdir -p $(GPU_CHECK_OUT)
	PYTHONUNBUFFERED=1 PYTHONPATH=$(CURDIR) $(GPU_PY) benchmarks/gpu_check.py $(GPU_CHECK_OUT) 2>&1 | tee $(GPU_CHECK_OUT)/log.txt

## gpu-check-tiny: the same stages on this CPU at tiny sizes (what CI runs through tests/test_gpu_check.py)
gpu-check-tiny: venv
	OMP_NUM_THREADS=1 PYTHONPATH=$(CURDIR) $(PY) benchmarks/gpu_check.py $(GPU_CHECK_OUT) --tiny

## gpu-check-dry: the full-size settings built and every stage constructed, nothing run (no GPU needed; CI runs it too)
gpu-check-dry: venv
	PYTHONPATH=$(CURDIR) $(PY) benchmarks/gpu_check.py $(GPU_CHECK_OUT) --dry-run

clean:
	rm -rf $(VENV) build *.egg-info
