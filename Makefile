# The two commands: `make run` and `make test`. Both install what is missing first.
.PHONY: run test test-fast test-sqlite test-postgresql lint bench install fuzz

PYTEST = .venv/bin/python -m pytest
# Two workers (pytest-xdist): the whole-stack tests (group "stack", tests/conftest_marks.py)
# run one at a time in one of them, everything else beside them.
WORKERS ?= 2
PARALLEL = -n $(WORKERS) --dist loadgroup

install:
	./scripts/bootstrap

run: install
	.venv/bin/radloop up

test: install lint test-sqlite test-postgresql

# Before each commit: lint and the tests that start no server (SQLite), a few minutes.
test-fast: install lint
	$(PYTEST) -q -m "not slow"

test-sqlite:
	$(PYTEST) -q $(PARALLEL) --durations=25

# The same suite against PostgreSQL 15, which the fixtures start in a temporary directory.
test-postgresql:
	RADLOOP_TEST_DATABASE=postgresql $(PYTEST) -q $(PARALLEL) --durations=25

# Longer fuzzing than make test's: the hypothesis properties with 50 times the examples and
# fresh randomness, then FUZZ_SECONDS of coverage-guided fuzzing (atheris) per input path.
# Findings: hypothesis prints a reproducer; atheris leaves data/fuzz/crash-*.
FUZZ_SECONDS ?= 600
fuzz: install
	RADLOOP_FUZZ_SCALE=50 $(PYTEST) -q -p no:cacheprovider --hypothesis-show-statistics \
		tests/test_fuzz_inputs.py tests/test_fuzz_api.py
	for target in instance series label; do \
		RADLOOP_FUZZ_DIR=data/fuzz .venv/bin/python -m tests.fuzz.harness $$target \
			-max_total_time=$(FUZZ_SECONDS) || exit 1; \
	done

lint:
	.venv/bin/ruff check .
	.venv/bin/ruff format --check .
	.venv/bin/mypy radloop dicom_listener agents flows model_registry tests bench
	.venv/bin/mypy deploy/docker/healthcheck.py deploy/docker/fetch_ohif.py
	.venv/bin/lint-imports

bench: install
	.venv/bin/python bench/ingest.py
