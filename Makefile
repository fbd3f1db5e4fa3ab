# Two entry points: `make demo` runs the main job, `make test` runs the tests.
# Both install what they need first (Debian packages, the venv, the gRPC stubs)
# and skip what is already done.

SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python
PROTOS := $(wildcard proto/ferry/v1/*.proto)
STUBS := ferry/v1/__init__.py

# libguestfs and qemu run without KVM on these machines.
export LIBGUESTFS_BACKEND ?= direct
export LIBGUESTFS_BACKEND_SETTINGS ?= force_tcg

.PHONY: setup demo test lint stubs clean

setup: .deps-stamp $(VENV)/.installed $(STUBS)
	@# Byte-compile like a wheel install would: the editable install does not,
	@# and under PYTHONDONTWRITEBYTECODE every run would compile again (this
	@# halves the start-up of `ferry copy`). Up-to-date files are skipped.
	@$(PY) -m compileall -q -j0 ferry transferd converter controlplane >/dev/null

.deps-stamp: tools/install-deps.sh
	@tools/install-deps.sh
	@touch $@

$(VENV)/.installed: pyproject.toml
	@test -x $(PY) || /usr/bin/python3 -m venv --system-site-packages $(VENV)
	@$(PY) -m pip install -q --upgrade pip
	@$(PY) -m pip install -q -e '.[dev]'
	@touch $@

stubs: $(STUBS)

$(STUBS): $(PROTOS) $(VENV)/.installed
	@mkdir -p ferry/v1
	@$(PY) -m grpc_tools.protoc -Iproto --python_out=. --grpc_python_out=. --pyi_out=. $(PROTOS)
	@touch $@

demo: setup
	@$(PY) -m demo

test: setup
	@$(VENV)/bin/ruff check .
	@$(VENV)/bin/mypy .
	@$(PY) -m pytest $(PYTEST_ARGS)

lint: setup
	@$(VENV)/bin/ruff check .
	@$(VENV)/bin/mypy .

clean:
	rm -rf $(VENV) ferry/v1 .deps-stamp
