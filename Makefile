# Two commands for a fresh clone: `make demo` and `make test`. Everything runs inside .venv.
SHELL := /bin/bash
PY ?= python3
VENV := .venv
VPY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
TASK ?= ich
# Per task: the built-in data set of the demo, the file that says it is complete, the run folder.
# ich: 160 studies of 12-18 slices at 256 px: many patients (what a from-scratch CNN needs), few pixels per slice
DEMO_PHANTOM_ich := --studies 160 --slices 12 18 --size 256 --seed 0
DEMO_DATA_ich := data/phantom
DEMO_MARK_ich := stage_2_train.csv
DEMO_OUT_ich := outputs/demo
# brats: task-1 NIfTI + task-2 DICOM of 60 patients (the generator's default is the 20-patient test set)
DEMO_PHANTOM_brats := --patients 60 --seed 0
DEMO_DATA_brats := data/phantom_brats
DEMO_MARK_brats := task2/train_labels.csv
DEMO_OUT_brats := outputs/demo_brats
# cspine: 60 neck CTs of 40-64 slices at 96 px, 8 test folders (the generator's default is the 12-study test set)
DEMO_PHANTOM_cspine := --studies 60 --size 96 --test-studies 8 --seed 0
DEMO_DATA_cspine := data/phantom_cspine
DEMO_MARK_cspine := train.csv
DEMO_OUT_cspine := outputs/demo_cspine
DEMO_PHANTOM ?= $(DEMO_PHANTOM_$(TASK))
DEMO_DATA ?= $(DEMO_DATA_$(TASK))
DEMO_OUT ?= $(DEMO_OUT_$(TASK))
export HF_HUB_OFFLINE := 1
export PYTHONUNBUFFERED := 1
export MPLBACKEND := Agg

.PHONY: demo test test-fast install data lab bench kernel clean-demo

install: $(STAMP)

$(STAMP): requirements.txt
	test -x $(VPY) || $(PY) -m venv $(VENV)
	$(VPY) -m pip install --upgrade --quiet pip
	$(VPY) -m pip install --quiet -r requirements.txt
	$(VPY) -m ipykernel install --sys-prefix --name python3 --display-name "Python 3 (rsna-ich .venv)" >/dev/null
	touch $(STAMP)

data: $(DEMO_DATA)/$(DEMO_MARK_$(TASK))

$(DEMO_DATA)/$(DEMO_MARK_$(TASK)): | $(STAMP)
	$(VPY) -m lib.phantom $(TASK) --out $(DEMO_DATA) $(DEMO_PHANTOM)

demo: $(STAMP) data
	$(VPY) -m lib.run params/$(TASK)/demo.yaml --data $(DEMO_DATA) --out $(DEMO_OUT) --resume
	$(VPY) -m lib.report $(DEMO_OUT)

test: $(STAMP)
	$(VPY) -m pytest

test-fast: $(STAMP)
	$(VPY) -m pytest -m "not slow"

# MPLBACKEND=Agg (exported above for plain processes) must not reach the lab's kernels: they draw inline
lab: $(STAMP)
	$(VPY) -m ipykernel install --user --name rsna-ich --display-name "RSNA ICH (.venv)"
	env -u MPLBACKEND $(VENV)/bin/jupyter lab --notebook-dir=.

bench: $(STAMP) data
	$(VPY) -m lib.bench preprocess --data $(DEMO_DATA)
	$(VPY) -m lib.bench loader
	$(VPY) -m lib.bench sequence

KERNEL_SLUG_ich := rsna-ich-demo-infer
KERNEL_SLUG_brats := rsna-brats-demo-infer
KERNEL_SLUG_cspine := rsna-cspine-demo-infer
# Package the demo run as the three Kaggle datasets and generate its offline inference kernel (nothing is pushed).
# TASK=ich | brats | cspine.
kernel: $(STAMP)
	$(VPY) -m lib.kaggle package-code --task $(TASK)
	$(VPY) -m lib.kaggle package-weights $(DEMO_OUT)
	$(VPY) -m lib.kaggle package-wheels --task $(TASK)
	$(VPY) -m lib.kaggle build-kernel --run $(DEMO_OUT) --slug $(KERNEL_SLUG_$(TASK))

clean-demo:
	rm -rf $(DEMO_OUT)
