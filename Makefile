# DETR+ — the two commands a new user needs:
#   make demo   install if needed, train the demo recipe (lean DDQ-DETR, 12 min) on the shapes data, print mAP
#   make test   install if needed, run the test suite (what CI runs)
PYTHON ?= python
DEMO_CONFIG ?= configs/shapes/ddq-detr-12min_shapes.py
DEMO_WORK_DIR ?= work_dirs/demo
PYTEST_ARGS ?=

.PHONY: install demo test test-all build-ext docs lint clean

install:
	PYTHON=$(PYTHON) bash tools/install.sh

demo: install
	$(PYTHON) tools/demo.py $(DEMO_CONFIG) --work-dir $(DEMO_WORK_DIR)

test: install
	DETR_PLUS_REQUIRE_EXT=1 $(PYTHON) -m pytest tests -m "not slow" $(PYTEST_ARGS)

test-all: install
	DETR_PLUS_REQUIRE_EXT=1 $(PYTHON) -m pytest tests $(PYTEST_ARGS)

# the style check (flake8, isort, yapf, codespell; also a test in make test)
lint:
	PYTHON=$(PYTHON) bash tools/lint.sh

# the documentation site (mkdocs.yml; strict: any warning fails)
docs:
	$(PYTHON) -m mkdocs build --strict -d build/docs

build-ext:
	$(PYTHON) setup.py build_ext --inplace

clean:
	rm -rf build dist *.egg-info .install-stamp projects_detr_plus/.mim \
		projects_detr_plus/ops/_C*.so
