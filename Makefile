# danqing: `make demo` and `make test` do all set-up on a fresh machine.
PYTHON ?= python3.11
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.stamp-install
TEST_STAMP := $(VENV)/.stamp-test
export HF_HUB_OFFLINE := 1
export HF_HUB_DISABLE_TELEMETRY := 1
export GRADIO_ANALYTICS_ENABLED := False

.PHONY: demo test bench serve clean doc-commands

$(STAMP): pyproject.toml constraints.txt
	@command -v $(PYTHON) >/dev/null 2>&1 || { echo "need $(PYTHON) (Python 3.11); set PYTHON=..."; exit 2; }
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	# torch first, the tested version, built for this machine (scripts/install_torch.sh: the CPU
	# build without an NVIDIA GPU, else the one for the driver's CUDA), so no other package pulls another
	scripts/install_torch.sh $(BIN)/pip
	$(BIN)/pip install --quiet -c constraints.txt -e .
	# spandrel (model upscalers, face restoration) declares torchvision, whose PyPI builds pull a CUDA
	# torch and do not work with ours: install it without dependencies (its real ones, einops,
	# safetensors, numpy, typing_extensions, are in pyproject). danqing imports it without
	# torchvision (danqing/models/upscalers.py::import_spandrel).
	$(BIN)/pip install --quiet --no-deps -c constraints.txt spandrel
	touch $(STAMP)

# the test dependencies on top (make test only)
$(TEST_STAMP): $(STAMP)
	$(BIN)/pip install --quiet -c constraints.txt -e ".[test]"
	# spandrel-extra-arches holds CodeFormer (non-commercial S-Lab licence): installed for its test
	# only, danqing never needs it; users who want CodeFormer install it themselves.
	$(BIN)/pip install --quiet --no-deps -c constraints.txt spandrel-extra-arches
	touch $(TEST_STAMP)

demo: $(STAMP)
	$(BIN)/danqing generate "a red circle left of a blue square" --seed 42 --steps 20 --sampler "DPM++ 2M" \
		--cfg 7 --width 64 --height 64 --out outputs/demo
	$(BIN)/danqing eval shapes outputs/demo/*.png
	@echo "demo image(s) in outputs/demo/ (64x64, danqing-tiny's native size); metadata: $(BIN)/danqing info outputs/demo/<file>.png"

test: $(TEST_STAMP)
	$(BIN)/python -m pytest

serve: $(STAMP)
	$(BIN)/danqing serve

bench: $(STAMP)
	$(BIN)/python bench/txt2img_cpu.py

# every command of README.md and docs/*.md, run with small sizes: the table in docs/commands.md
doc-commands: $(STAMP)
	$(BIN)/python scripts/doc_commands.py --markdown docs/commands.md

clean:
	rm -rf $(VENV) outputs .pytest_cache
