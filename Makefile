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

.PHONY: venv test check-sync nbtest pytest smoke gpu-check gpu-check-tiny clean

$(VENV)/.installed: setup.py settings.ini
	test -x $(PY) || python3 -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q $(TORCH)           # torch first, so nothing pulls a CUDA build
	$(BIN)/pip install -q -e ".[dev]"
	$(PY) -m ipykernel install --sys-prefix --name python3 >/dev/null
	touch $@

venv: $(VENV)/.installed

## test: notebooks and library in sync, notebook tests, pytest
test: check-sync nbtest pytest

check-sync: venv
	@before=$$(git status --porcelain -- nbs quantstudy | sha256sum; git diff -- nbs quantstudy | sha256sum); \
	$(BIN)/nbdev_clean && $(BIN)/nbdev_export; \
	after=$$(git status --porcelain -- nbs quantstudy | sha256sum; git diff -- nbs quantstudy | sha256sum); \
	if [ "$$before" != "$$after" ]; then \
	  echo "nbdev_clean/nbdev_export changed nbs/ or quantstudy/: run them and commit the result"; \
	  git status --short -- nbs quantstudy; exit 1; fi; \
	echo "nbs/ and quantstudy/ are in sync"

nbtest: venv
	OMP_NUM_THREADS=1 $(BIN)/nbdev_test --n_workers 2 --timing   # one thread per worker: 2 workers on 2 cores

pytest: venv
	$(BIN)/pytest -q tests

## smoke: the smoke study on this machine (CPU, minutes): trains, evaluates, writes papermill_runs/smoke and figures/smoke
smoke: venv
	$(BIN)/quantstudy study smoke

## gpu-check: every GPU check and figure in one run, under 7 minutes on one H100/H200 (benchmarks/README.md).
## It uses the machine's own python3 (torch + CUDA), not the CPU venv: nothing to install, the checkout is enough.
GPU_PY        ?= python3
GPU_CHECK_OUT ?= gpu_check_out
gpu-check:
	mkdir -p $(GPU_CHECK_OUT)
	PYTHONUNBUFFERED=1 PYTHONPATH=$(CURDIR) $(GPU_PY) benchmarks/gpu_check.py $(GPU_CHECK_OUT) 2>&1 | tee $(GPU_CHECK_OUT)/log.txt

## gpu-check-tiny: the same stages on this CPU at tiny sizes (what CI runs through tests/test_gpu_check.py)
gpu-check-tiny: venv
	OMP_NUM_THREADS=1 PYTHONPATH=$(CURDIR) $(PY) benchmarks/gpu_check.py $(GPU_CHECK_OUT) --tiny

clean:
	rm -rf $(VENV) build *.egg-info
