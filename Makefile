# adapterctl: `make help` lists the targets.
SHELL := /bin/bash
VENV ?= .venv
PYTHON ?= python3
PY := $(VENV)/bin/python
STAMP := $(VENV)/.install-stamp
PYTEST_ARGS ?=

.DEFAULT_GOAL := help

GPUS ?= 8
NNODES ?= 1
TORCHRUN := $(VENV)/bin/torchrun --nnodes $(NNODES) --nproc_per_node $(GPUS)
DEMO_DATA ?= datasets/synthetic_seg
DEMO_DET_DATA ?= datasets/synthetic_det
ADE20K_ROWS := ade20k_upernet_vit_adapter_t ade20k_upernet_vit_adapter_s ade20k_upernet_vit_adapter_b \
	ade20k_upernet_vit_adapter_t_augreg ade20k_upernet_vit_adapter_b_augreg ade20k_upernet_vit_adapter_l_augreg \
	ade20k_upernet_beit_adapter_l_640
M2F_ROWS := ade20k_mask2former_beit_adapter_l_640 ade20k_mask2former_beit_adapter_l_896 \
	ade20k_mask2former_beitv2_adapter_l_896 cocostuff164k_mask2former_beit_adapter_l_896 \
	cocostuff164k_mask2former_beitv2_adapter_l_896 cocostuff10k_mask2former_beit_adapter_l_512 \
	cityscapes_mask2former_beit_adapter_l_896 pascal_context59_mask2former_beit_adapter_l_480 \
	cocostuff10k_mask2former_beit_adapter_b_512 pascal_context59_mask2former_beit_adapter_b_480 \
	cocostuff10k_upernet_beit_adapter_l_512 cocostuff164k_upernet_beit_adapter_l_640 \
	pascal_context59_upernet_beit_adapter_l_480
RECIPES := ade20k_upernet_dinov2_adapter_l_512 ade20k_mask2former_dinov2_adapter_l_896_frozen \
	ade20k_mask2former_dinov3_adapter_l_896_frozen
COCO_ROWS := $(foreach s,t s b l,$(foreach k,1x 3x,coco_maskrcnn_vit_adapter_$(s)_$(k))) \
	coco_cascade_maskrcnn_vit_adapter_s_3x coco_cascade_maskrcnn_vit_adapter_b_3x coco_htc_vit_adapter_l_augreg_3x \
	coco_htc_beit_adapter_l_3x coco_htc_beitv2_adapter_l_3x coco_htc_beitv2_adapter_l_o365
PAPER_ROWS := $(ADE20K_ROWS) $(M2F_ROWS) $(COCO_ROWS)
ALL_ROWS := $(PAPER_ROWS) $(RECIPES)

.PHONY: help install test test-all lint bench bench-m2f bench-models demo demo-m2f demo-det demo-cascade demo-htc experiments faults $(ALL_ROWS)

help: ## List the targets
	@grep -E '^[a-zA-Z0-9_-]+:.*?## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*?## "}; {printf "  %-14s %s\n", $$1, $$2}'
	@echo "  Paper rows (real data, GPUS=$(GPUS) per node, NNODES=$(NNODES), extra overrides in ARGS=...):"
	@for r in $(PAPER_ROWS); do echo "    make $$r"; done
	@echo "  Recipes beyond the paper (DINOv2 / DINOv3 backbones; no paper number):"
	@for r in $(RECIPES); do echo "    make $$r"; done

install: $(STAMP) ## Create .venv (when missing) and install adapterctl with its dev and export extras

$(STAMP): pyproject.toml constraints.txt
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -c constraints.txt -e '.[dev,export]'
	@touch $(STAMP)

test: install ## The fast test suite (what CI runs)
	$(PY) -m pytest -q -m "not slow" $(PYTEST_ARGS)

test-all: install ## Every test, the slow ones (distributed runs, training to a target) too
	$(PY) -m pytest -q $(PYTEST_ARGS)

lint: install ## ruff
	$(VENV)/bin/ruff check adapterctl tests scripts

demo: install ## Synthesise data, train ViT-Adapter-T + UperNet on CPU for a few minutes, print the mIoU table
	@test -d $(DEMO_DATA)/images || $(VENV)/bin/adapterctl data synth --task seg --out $(DEMO_DATA)
	$(VENV)/bin/adapterctl train experiment=synthetic_upernet_vit_adapter_t_demo data.root=$(DEMO_DATA)

demo-m2f: install ## Synthesise data, train ViT-Adapter-T + Mask2Former on CPU (about 10 minutes), print mIoU
	@test -d $(DEMO_DATA)/images || $(VENV)/bin/adapterctl data synth --task seg --out $(DEMO_DATA)
	$(VENV)/bin/adapterctl train experiment=synthetic_mask2former_vit_adapter_t_demo data.root=$(DEMO_DATA)

demo-det: install ## Synthesise COCO-format data, train ViT-Adapter-T + Mask R-CNN on CPU, print box/mask AP
	@test -d $(DEMO_DET_DATA)/annotations || $(VENV)/bin/adapterctl data synth --task det --out $(DEMO_DET_DATA)
	$(VENV)/bin/adapterctl train experiment=synthetic_maskrcnn_vit_adapter_t_demo data.root=$(DEMO_DET_DATA)

demo-cascade: install ## The same synthetic COCO set, ViT-Adapter-T + Cascade Mask R-CNN on CPU, print box/mask AP
	@test -d $(DEMO_DET_DATA)/annotations || $(VENV)/bin/adapterctl data synth --task det --out $(DEMO_DET_DATA)
	$(VENV)/bin/adapterctl train experiment=synthetic_cascade_maskrcnn_vit_adapter_t_demo data.root=$(DEMO_DET_DATA)

demo-htc: install ## The same synthetic COCO set (with its stuff maps), ViT-Adapter-T + HTC++ on CPU, print box/mask AP
	@test -d $(DEMO_DET_DATA)/stuffthingmaps || $(VENV)/bin/adapterctl data synth --task det --out $(DEMO_DET_DATA)
	$(VENV)/bin/adapterctl train experiment=synthetic_htc_vit_adapter_t_demo data.root=$(DEMO_DET_DATA)

faults: install ## Kill / preempt / NaN / disk-full / unwritable / second-run scenarios end to end: what survived
	$(PY) scripts/faults.py

experiments: install ## List the reproduction experiments with their hyperparameters and the paper's results
	$(VENV)/bin/adapterctl experiments

$(ALL_ROWS): install ## Paper rows (real ADE20K / COCO-Stuff / Cityscapes / Pascal Context / COCO, $$GPUS GPUs per node via torchrun)
	$(TORCHRUN) -m adapterctl train experiment=$@ $(ARGS)

bench: install ## ViT-Adapter-T vs plain ViT-T at 512x512 (forward, forward+backward, ratio, GFLOP/s)
	$(VENV)/bin/adapterctl bench --size t --input 512

bench-models: install ## Whole paper-row models (UperNet-T ADE20K 512, Mask R-CNN-T COCO 1333x800, Mask2Former BEiT-Adapter-B 480): inference, training step, GFLOPs, images/s, peak memory
	$(VENV)/bin/adapterctl bench --model ade20k_upernet_vit_adapter_t --model coco_maskrcnn_vit_adapter_t_3x \
		--model pascal_context59_mask2former_beit_adapter_b_480 --runs 3 --warmup 1

bench-m2f: install ## A Mask2Former training step (the demo model) split into backbone / pixel decoder / decoder / matching / loss / backward
	$(VENV)/bin/adapterctl bench --m2f-step synthetic_mask2former_vit_adapter_t_demo
