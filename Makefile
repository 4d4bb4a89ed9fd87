# The two set-up commands of the README:
#   make demo   installs tinysam-rt with the export extra, exports a model (random weights unless
#               CHECKPOINT=path/to/tinysam_42.3.pth), segments the bundled sample image.
#   make test   installs the dev extra and runs the test suite (what .ci/run calls).
PYTHON ?= python3
PIP ?= $(PYTHON) -m pip
MODEL ?= models/vit_t
CHECKPOINT ?=
EXPORT_SOURCE = $(if $(CHECKPOINT),--checkpoint $(CHECKPOINT),--random-seed 0)

.PHONY: demo test install-dev model bench

demo:
	$(PIP) install -q -e '.[export]'
	$(PYTHON) -m tinysam_rt.cli export $(EXPORT_SOURCE) --out $(MODEL)
	$(PYTHON) -m tinysam_rt.cli segment samples/scene.png --point 220,300 --point 410,220,0 --model $(MODEL) --out out/demo
	@echo "overlay: out/demo/overlay.png"

install-dev:
	$(PIP) install -q -e '.[dev]'

test: install-dev
	$(PYTHON) -m pytest -q

model:
	$(PYTHON) -m tinysam_rt.cli export $(EXPORT_SOURCE) --out $(MODEL)

# Regenerates the tinysam-bench and PyTorch-vs-ORT sections of benchmarks/RESULTS.md
# (add INT8_MODEL=models/vit_t-int8 to put an INT8 model beside FP32).
INT8_MODEL ?=
bench:
	$(PYTHON) benchmarks/update_results.py --model $(MODEL) $(if $(INT8_MODEL),--model $(INT8_MODEL)) --runs 10 --warmup 2
