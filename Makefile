# Transformer Lab — every entry point a learner, an instructor or a maintainer needs.
# `make lab` sets up .venv and opens the course; `make test` runs every check.
PYTHON ?= python3.11
VENV   ?= .venv
BIN    := $(abspath $(VENV))/bin
# nbgrader calls `alembic` by name, so the environment's bin must be on PATH.
export PATH := $(BIN):$(PATH)

.PHONY: help setup lab lab-instructor test test-fast test-slow test-notebooks release grade book bench bench-grading bench-grading-dask clean hub-setup hub test-hub

help:
	@echo "make lab       install everything (first run) and open the course in JupyterLab"
	@echo "make lab-instructor  JupyterLab on the repository with nbgrader's instructor tools"
	@echo "make test      run every check: library, notebooks, grader round trip, website"
	@echo "make test-fast library tests only (seconds)"
	@echo "make test-notebooks  every instructor notebook in normal mode (nbval; not part of make test)"
	@echo "make release   regenerate course/ from solutions/ (nbgrader generate_assignment)"
	@echo "make grade SUBMISSIONS=dir [LECTURE=01_attention]   autograde a class"
	@echo "make book      build the website into jupyter_book/_build/html (offline)"
	@echo "make bench     run the benchmarks in benchmarks/ (not part of make test)"
	@echo "make bench-grading  time the autograder on a synthetic class of 60 (~10 min)"
	@echo "make bench-grading-dask  a class of 60 on one machine vs a local Dask cluster (~10 min)"
	@echo "make hub INSTRUCTORS=a STUDENTS=b,c  the course on JupyterHub, as root (autograder/jupyterhub/README.md)"
	@echo "make test-hub  only the JupyterHub round test (root; part of make test)"

$(BIN)/activate:
	@command -v $(PYTHON) >/dev/null 2>&1 || { echo "error: $(PYTHON) not found; install Python 3.11 or run 'make PYTHON=python3 ...'"; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --upgrade pip

$(VENV)/.installed: $(BIN)/activate pyproject.toml
	$(BIN)/pip install -e '.[dev]'
	$(BIN)/jupyter labextension enable --level=sys_prefix nbgrader 2>/dev/null || true
	$(BIN)/jupyter server extension enable --sys-prefix nbgrader 2>/dev/null || true
	touch $@

setup: $(VENV)/.installed

# A learner's JupyterLab on course/, without nbgrader's instructor tools (jupyter/lab.py says why);
# an instructor's on the repository, with them.
lab: setup
	$(BIN)/python jupyter/lab.py course/

lab-instructor: setup
	$(BIN)/python jupyter/lab.py --instructor

test-fast: setup
	$(BIN)/python -m pytest -q lib/tests

# The book executes every learner notebook in normal mode and the class round trip (in pytest)
# grades every instructor notebook in grading mode: a third run of each notebook in normal mode
# (nbval) would cost about 30 s a lecture, 7 minutes of CI with 15 lectures. It is test-notebooks.
test: setup book hub-setup
	$(BIN)/python -m pytest -q

test-notebooks: setup
	$(BIN)/python -m pytest -q --nbval-lax solutions/

test-slow: setup
	$(BIN)/python -m pytest -q --runslow

release: setup
	$(BIN)/python -m autograder release

LECTURE ?= all
grade: setup
	@test -n "$(SUBMISSIONS)" || { echo "usage: make grade SUBMISSIONS=folder|zip|notebook [LECTURE=01_attention] [OUT=dir] [WORKERS=n] [TIMEOUT=s] [SCHEDULER=tcp://host:port]"; exit 2; }
	$(BIN)/python -m autograder grade "$(SUBMISSIONS)" --lecture $(LECTURE) $(if $(OUT),--out "$(OUT)") $(if $(WORKERS),--workers $(WORKERS)) $(if $(TIMEOUT),--timeout $(TIMEOUT)) $(if $(SCHEDULER),--scheduler "$(SCHEDULER)")

book: setup
	$(BIN)/python jupyter_book/build.py

bench: setup
	$(BIN)/python benchmarks/attention.py
	$(BIN)/python benchmarks/inference.py
	$(BIN)/python benchmarks/recurrent.py
	$(BIN)/python benchmarks/decoding.py
	$(BIN)/python benchmarks/notebooks.py

bench-grading: setup
	$(BIN)/python benchmarks/grading.py

bench-grading-dask: setup
	$(BIN)/python benchmarks/grading.py --cluster

# The course on JupyterHub (autograder/jupyterhub/README.md): configurable-http-proxy from npm,
# into autograder/jupyterhub/node_modules (git-ignored), like the book's npm packages.
HUB := autograder/jupyterhub
CHP := $(HUB)/node_modules/.bin/configurable-http-proxy
$(CHP): $(HUB)/package.json
	@command -v npm >/dev/null 2>&1 || { echo "error: npm not found; JupyterHub's proxy comes from npm (install Node.js, e.g. apt-get install nodejs npm)"; exit 1; }
	npm install --prefix $(HUB) --no-package-lock --no-audit --no-fund --loglevel=error
	touch $@

hub-setup: setup $(CHP)

HUB_STATE ?= /srv/jupyterhub
hub: hub-setup
	@test -n "$(INSTRUCTORS)" || { echo "usage: make hub INSTRUCTORS=user[,user] STUDENTS=user,user [COURSE_ID=transformer-lab] [EXCHANGE=/srv/nbgrader/exchange] [HUB_STATE=/srv/jupyterhub]"; exit 2; }
	mkdir -p $(HUB_STATE)
	cd $(HUB_STATE) && TLAB_INSTRUCTORS="$(INSTRUCTORS)" TLAB_STUDENTS="$(STUDENTS)" \
	  $(if $(COURSE_ID),TLAB_COURSE_ID="$(COURSE_ID)") $(if $(EXCHANGE),TLAB_EXCHANGE="$(EXCHANGE)") \
	  $(BIN)/jupyterhub -f $(abspath $(HUB))/jupyterhub_config.py

test-hub: hub-setup
	$(BIN)/python -m pytest -q -s --runslow autograder/tests/test_jupyterhub.py

clean:
	rm -rf jupyter_book/_build .pytest_cache
