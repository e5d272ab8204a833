# The two commands: `make study` (demo cohort → every study) and `make test`. Both install into .venv first.
PYTHON ?= python3.11
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
export PIP_CONSTRAINT := $(CURDIR)/constraints.txt
export PIP_DISABLE_PIP_VERSION_CHECK := 1

.PHONY: install study demo test export clean-results bench gpu-check tune repeats external twins check tiling-check baseline-check curves-check draws cohorts sizes lock

install: $(STAMP)

$(STAMP): settings.ini setup.py constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip wheel
	$(BIN)/pip install -q -e ".[dev]"
	$(BIN)/pip check
	touch $(STAMP)

# constraints.txt holds the pins pip cannot find alone, then (after the "# --- lock" line) every package at the version
# the results were measured with, so `make install` gives the same set on any day. `make lock` re-resolves the set
# from settings.ini and the pins above the line in a scratch venv and rewrites the list; rerun the studies after it.
LOCK_VENV := .lock-venv
lock:
	rm -rf $(LOCK_VENV) && $(PYTHON) -m venv $(LOCK_VENV)
	sed '/^# --- lock/,$$d' constraints.txt > $(LOCK_VENV)/pins.txt
	PIP_CONSTRAINT=$(CURDIR)/$(LOCK_VENV)/pins.txt $(LOCK_VENV)/bin/pip install -q --upgrade pip wheel
	PIP_CONSTRAINT=$(CURDIR)/$(LOCK_VENV)/pins.txt $(LOCK_VENV)/bin/pip install -q -e ".[dev]"
	$(LOCK_VENV)/bin/pip check
	{ cat $(LOCK_VENV)/pins.txt; \
	  echo "# --- lock: every package as \`make lock\` resolved it on $$(date +%Y-%m-%d) (Python $$($(LOCK_VENV)/bin/python -c 'import platform; print(platform.python_version())'), $$(uname -s) $$(uname -m)); made by make lock, not by hand"; \
	  $(LOCK_VENV)/bin/pip freeze --exclude-editable; } > constraints.txt.tmp && mv constraints.txt.tmp constraints.txt
	rm -rf $(LOCK_VENV)
	rm -f $(STAMP)

demo: install   ## the demo cohort alone (the runner also builds it when missing)
	$(BIN)/wsi-study demo-data data/demo

study: install  ## build the demo cohort if absent, then run every study in configs/study.yaml on it
	$(BIN)/wsi-study run configs/study.yaml --cohort demo --out results

bench: install  ## the four benchmarks (ratios against baselines run side by side) into results/bench; run on a quiet machine
	$(BIN)/wsi-study bench io embed tiling mil --out results/bench

# the CMU slide's 117 patches take a GPU milliseconds, so gpu-check also embeds 10,000 patches of a 24,000-px synthetic slide
GPU_SLIDE := results/bench_cuda/cache/synthetic_24000px_C_seed0.tiff
GPU_READERS ?= 8
gpu-check: install  ## on a machine with a CUDA GPU: embed_slide's and train_cv's CUDA paths against the CPU (tests/test_cuda.py), then bench embed and bench mil on the GPU
	$(BIN)/python -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 'make gpu-check: torch sees no CUDA GPU on this machine')"
	$(BIN)/pytest -q -rs tests/test_cuda.py
	$(BIN)/wsi-study bench embed --device cuda --out results/bench_cuda
	$(BIN)/python -c "from wsi_study.bench_tiling import synthetic_slide; synthetic_slide('results/bench_cuda/cache', 24000)"
	$(BIN)/wsi-study bench embed --device cuda --slide $(GPU_SLIDE) --encoder random:resnet50_trunc --batch-size 128 \
		--workers $(GPU_READERS) --patches 10000 --rounds 3 --out results/bench_cuda/resnet50_trunc
	$(BIN)/wsi-study bench embed --device cuda --slide $(GPU_SLIDE) --encoder random:vit_large_patch16_224 --batch-size 128 \
		--workers $(GPU_READERS) --patches 4000 --rounds 3 --no-tiatoolbox --out results/bench_cuda/vit_large
	$(BIN)/wsi-study bench mil --device cuda --out results/bench_cuda/mil

DEV_FEATURES := results/demo_dev/features/2mpp_224px_0px/efficientnet_lite0
tune: install   ## choose the MIL defaults on demo_dev (100 patients) and check the stage head's weight on demo_small_dev (40), never on demo (~50 min; ~45 with their features built)
	$(BIN)/wsi-study run configs/study.yaml --cohort demo_dev --cohort demo_small_dev --only 10_tiling --only 20_embedding --out results
	$(BIN)/wsi-study tune data/demo_dev/manifest.csv --features $(DEV_FEATURES) --model meanpool \
		--grid pca=8,16,32,64 --grid penalizer=0.1,1.0 --out results/demo_dev/tune/meanpool_survival
	$(BIN)/wsi-study tune data/demo_dev/manifest.csv --features $(DEV_FEATURES) --model deepattnmisl \
		--grid size_prior=false,true --grid aux_weight=0.5,0.7,1 --grid batch_size=16,64 --min-localisation 0.9 \
		--out results/demo_dev/tune/deepattnmisl_survival
	$(BIN)/wsi-study tune data/demo_small_dev/manifest.csv --features results/demo_small_dev/features/2mpp_224px_0px/efficientnet_lite0 \
		--model deepattnmisl --grid aux_weight=0.5,0.7,1 --grid batch_size=16,64 --seeds $(SEEDS) \
		--out results/demo_small_dev/tune/deepattnmisl_aux
	@echo 'A proposal that is not the default becomes it only if it passes the rule: make twins, then'
	@echo '  make check CHECK_NAME=<name> CHECK_GRID="--grid <key>=<value> ..."   (README, "check-default")'

DEMO_FEATURES := results/demo/features/2mpp_224px_0px/efficientnet_lite0
SEEDS := 0 1 2 3 4 5 6 7 8 9
repeats: install  ## after make study: the demo's survival models cross-validated once per split seed 0-9, then compare-seeds (~10 min)
	for m in deepattnmisl abmil meanpool stage_cox; do \
		$(BIN)/wsi-study train data/demo/manifest.csv --features $(DEMO_FEATURES) --model $$m --task survival \
			--seeds $(SEEDS) --out results/demo/repeats/$${m}_survival || exit $$?; \
	done
	$(BIN)/wsi-study compare-seeds $(foreach m,deepattnmisl abmil meanpool stage_cox,results/demo/repeats/$(m)_survival) \
		--target "oracle_gap<=0.05" --target "localisation_auc>=0.85" --target "truth_cox_gap<=0" --target "stage_added_p<=0.05" --target "ipa>=0" \
		--out results/demo/repeats/compare

EXTERNAL := results/demo/external
external: install  ## after make study: train on demo_dev (100 patients; features built when missing), test on the demo (40), split seeds 0-9: an external validation (~7 min with their features built)
	$(BIN)/wsi-study run configs/study.yaml --cohort demo_dev --only 10_tiling --only 20_embedding --out results
	for m in deepattnmisl abmil meanpool stage_cox; do \
		$(BIN)/wsi-study train data/demo_dev/manifest.csv --features $(DEV_FEATURES) --model $$m --task survival --seeds $(SEEDS) \
			--test-manifest data/demo/manifest.csv --test-features $(DEMO_FEATURES) --out $(EXTERNAL)/$${m}_survival || exit $$?; \
	done
	$(BIN)/wsi-study train data/demo_dev/manifest.csv --features $(DEV_FEATURES) --model deepattnmisl --task stage --seeds $(SEEDS) \
		--test-manifest data/demo/manifest.csv --test-features $(DEMO_FEATURES) --out $(EXTERNAL)/deepattnmisl_stage
	$(BIN)/wsi-study compare-seeds $(foreach m,deepattnmisl abmil meanpool stage_cox,$(EXTERNAL)/$(m)_survival) \
		--target "oracle_gap<=0.05" --target "localisation_auc>=0.85" --target "stage_added_p<=0.05" --target "ipa>=0" --out $(EXTERNAL)/compare

# the cohorts' features (built when missing), then DeepAttnMISL cross-validated on each over split seeds 0-9
define deepattnmisl_repeats
	$(BIN)/wsi-study run configs/study.yaml $(foreach c,$(1),--cohort $(c)) --only 10_tiling --only 20_embedding --out results
	for c in $(1); do \
		$(BIN)/wsi-study train data/$$c/manifest.csv --features results/$$c/features/2mpp_224px_0px/efficientnet_lite0 \
			--model deepattnmisl --task survival --seeds $(SEEDS) --out results/$$c/repeats/deepattnmisl_survival || exit $$?; \
	done
endef

TWINS := demo_dev demo_small_dev demo_small_dev3
twins: install  ## DeepAttnMISL over split seeds 0-9 on the development twins, 100, 40 and 40 patients (~15 min with their features built; building adds ~12)
	$(call deepattnmisl_repeats,$(TWINS))

DRAWS := demo_draw4 demo_draw5 demo_draw6 demo_draw7 demo_draw8
draws: install  ## DeepAttnMISL over split seeds 0-9 on five fresh demo-sized draws, evaluation only (~31 min, building their features included)
	$(call deepattnmisl_repeats,$(DRAWS))

SMALL := demo demo_small_dev demo_small_dev3 $(DRAWS)
cohorts: install  ## after make repeats, twins and draws: DeepAttnMISL's ten-seed means on each demo-sized cohort, one row each (seconds)
	$(BIN)/wsi-study summarise-seeds $(foreach c,$(SMALL),results/$(c)/repeats/deepattnmisl_survival) \
		--target "oracle_gap<=0.05" --target "localisation_auc>=0.85" --out results/cohorts

sizes: install  ## DeepAttnMISL on random subsets of 40, 80 and 120 patients of a fresh 160-patient draw (demo_sizes) and on all of it: the gap to the oracle against the cohort's size, evaluation only (~30 min here, 8 of them building its features)
	$(BIN)/wsi-study run configs/study.yaml --cohort demo_sizes --only 10_tiling --only 20_embedding --out results
	$(BIN)/python -c "from wsi_study.evaluation.tune import size_curve; size_curve('data/demo_sizes/manifest.csv', \
		'results/demo_sizes/features/2mpp_224px_0px/efficientnet_lite0', out_dir='results/demo_sizes/sizes')"

CHECK_NAME ?= candidate
CHECK_GRID ?=
check: install  ## after make twins: a candidate default (CHECK_NAME=..., CHECK_GRID="--grid k=v ...") on the twins over split seeds 0-9, then the rule (check-default) against make twins (~20 min)
	@test -n "$(CHECK_GRID)" || { echo 'error: name the candidate, e.g. make check CHECK_NAME=stackmass CHECK_GRID="--grid stack=true --grid stack_on=mass"' >&2; exit 2; }
	@for c in $(TWINS); do test -f results/$$c/repeats/deepattnmisl_survival/sweep.csv || \
		{ echo "error: results/$$c/repeats/deepattnmisl_survival has no runs; run make twins first" >&2; exit 2; }; done
	for c in $(TWINS); do \
		$(BIN)/wsi-study tune data/$$c/manifest.csv --features results/$$c/features/2mpp_224px_0px/efficientnet_lite0 \
			--model deepattnmisl $(CHECK_GRID) --seeds $(SEEDS) --out results/$$c/tune/$(CHECK_NAME) || exit $$?; \
	done
	$(BIN)/wsi-study check-default $(foreach c,$(TWINS),--pair results/$(c)/repeats/deepattnmisl_survival results/$(c)/tune/$(CHECK_NAME)) \
		--out results/check/$(CHECK_NAME)

# mean-pool Cox's penalty: chosen by inner cross-validation on each training fold (penalizer=cv) against the fixed 0.1,
# both as one-setting sweeps (so the check reads the same whichever is the default), then the rule written down in
# nbs/19_cv.ipynb before it ran: IPA up over the twins and on two of three, C down by no more than 0.005 on average
# (with the curves from mean-pool's own coefficients, inner_curves=false, as the check ran before inner_curves became its default)
# one sweep over split seeds 0-9 on a twin: $(1) the twin, $(2) the model and grid, $(3) the folder under results/<twin>/tune
TWIN_SWEEP = wsi-study tune data/$(1)/manifest.csv --features results/$(1)/features/2mpp_224px_0px/efficientnet_lite0 \
	$(2) --seeds $(SEEDS) --out results/$(1)/tune/$(3)
MEANPOOL_TWIN = $(call TWIN_SWEEP,$(1),--model meanpool --grid penalizer=$(2) --grid inner_curves=false,meanpool_penalizer_$(2))
MEANPOOL_PAIRS = $(foreach c,$(TWINS),--pair results/$(c)/tune/meanpool_penalizer_0.1 results/$(c)/tune/meanpool_penalizer_cv)
baseline-check: install  ## mean-pool's Cox penalty (against the fixed 0.1) and its stage model's C (against 1) by inner cross-validation on the twins, split seeds 0-9, then the rules (~8 min with the twins' features built; building adds ~12)
	$(BIN)/wsi-study run configs/study.yaml $(foreach c,$(TWINS),--cohort $(c)) --only 10_tiling --only 20_embedding --out results
	for c in $(TWINS); do \
		$(BIN)/$(call MEANPOOL_TWIN,$$c,0.1) || exit $$?; \
		$(BIN)/$(call MEANPOOL_TWIN,$$c,cv) || exit $$?; \
	done
	-$(BIN)/wsi-study check-default $(MEANPOOL_PAIRS) --metric ipa --min-positive 2 --max-localisation-drop none \
		--out results/check/meanpool_cv_ipa
	-$(BIN)/wsi-study check-default $(MEANPOOL_PAIRS) --min-mean-diff -0.005 --min-positive 0 --max-localisation-drop none \
		--out results/check/meanpool_cv_cindex
	for c in $(TWINS); do for v in 1.0 cv; do \
		$(BIN)/$(call TWIN_SWEEP,$$c,--model meanpool --task stage --grid C=$$v,meanpool_stage_C_$$v) || exit $$?; \
	done; done
	-$(BIN)/wsi-study check-default $(foreach c,$(TWINS),--pair results/$(c)/tune/meanpool_stage_C_1.0 results/$(c)/tune/meanpool_stage_C_cv) \
		--min-positive 2 --max-localisation-drop none --out results/check/meanpool_stage_c

# the Cox baselines' survival curves from held-out risks (inner_curves=true) against the default, mean-pool and the
# stage-alone Cox model each judged by the rule written down in nbs/19_cv.ipynb before it ran: IPA up over the twins
# and on two of three (their C-indices are untouched)
CURVES_TWIN = $(call TWIN_SWEEP,$(1),--model $(2) --grid inner_curves=$(3),$(2)_inner_curves_$(3))
CURVES_PAIRS = $(foreach c,$(TWINS),--pair results/$(c)/tune/$(1)_inner_curves_false results/$(c)/tune/$(1)_inner_curves_true)
curves-check: install  ## mean-pool's and the stage-alone Cox model's curves from inner-fold risks against the default on the twins, split seeds 0-9, then the rule (~10-15 min with the twins' features built)
	$(BIN)/wsi-study run configs/study.yaml $(foreach c,$(TWINS),--cohort $(c)) --only 10_tiling --only 20_embedding --out results
	for m in meanpool stage_cox; do for c in $(TWINS); do \
		$(BIN)/$(call CURVES_TWIN,$$c,$${m},false) || exit $$?; \
		$(BIN)/$(call CURVES_TWIN,$$c,$${m},true) || exit $$?; \
	done; done
	-$(BIN)/wsi-study check-default $(call CURVES_PAIRS,meanpool) --metric ipa --min-positive 2 --max-localisation-drop none \
		--out results/check/meanpool_inner_curves
	-$(BIN)/wsi-study check-default $(call CURVES_PAIRS,stage_cox) --metric ipa --min-positive 2 --max-localisation-drop none \
		--out results/check/stage_cox_inner_curves

# tiling-check: the candidate runs as a one-setting tune of the default's own value (mass=true), i.e. DeepAttnMISL's
# defaults on the other features, in the layout check-default reads
CHECK_MPP ?= 1
tiling-check: install  ## after make twins: the twins tiled and embedded at CHECK_MPP µm/px (default 1; the studies use 2), DeepAttnMISL's defaults unchanged, then the rule (check-default) against make twins (~70 min, most of it the features)
	$(BIN)/wsi-study run configs/study.yaml $(foreach c,$(TWINS),--cohort $(c)) --only 10_tiling --only 20_embedding \
		--param target_mpp=$(CHECK_MPP) --out results/tiling_$(CHECK_MPP)mpp
	for c in $(TWINS); do \
		$(BIN)/wsi-study tune data/$$c/manifest.csv --features results/tiling_$(CHECK_MPP)mpp/$$c/features/$(CHECK_MPP)mpp_224px_0px/efficientnet_lite0 \
			--model deepattnmisl --grid mass=true --seeds $(SEEDS) --out results/$$c/tune/$(CHECK_MPP)mpp || exit $$?; \
	done
	$(BIN)/wsi-study check-default $(foreach c,$(TWINS),--pair results/$(c)/repeats/deepattnmisl_survival results/$(c)/tune/$(CHECK_MPP)mpp) \
		--other-features --out results/check/$(CHECK_MPP)mpp

test: install   ## nbdev drift check, notebook tests, pytest
	$(BIN)/python tests/check_drift.py
	$(BIN)/nbdev_test --n_workers 2
	$(BIN)/pytest -q tests

export:         ## strip notebook noise, then notebooks → wsi_study/
	$(BIN)/nbdev_clean
	$(BIN)/nbdev_export

clean-results:
	rm -rf results
