# Two commands on a fresh Debian 12 machine, as root: `make demo` and `make test`.
# Each first installs what is missing (Debian packages, the virtualenv, the guest images), idempotently.

PYTHON ?= /usr/bin/python3
VENV   := .venv
BIN    := $(VENV)/bin
HOST_PACKAGES := ansible/host-packages.txt
IMAGES := enclave parent cvm
export PIP_DISABLE_PIP_VERSION_CHECK := 1

.PHONY: demo test host venv images lint unit integration bench clean

demo: host venv images
	$(BIN)/teelab demo

# pytest exits 5 when it collects no tests; make fails on any non-zero status, so that cannot pass.
test: host venv images lint
	$(BIN)/pytest tests

host:
	@missing=$$(sed 's/#.*//' $(HOST_PACKAGES) | xargs -n1 | while read -r p; do \
	    dpkg-query -W -f='$${Status}\n' "$$p" 2>/dev/null | grep -q '^install ok installed' || echo "$$p"; done); \
	if [ -n "$$missing" ]; then \
	    echo "installing host packages:" $$missing; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing; \
	fi

venv: $(BIN)/.installed

$(BIN)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test,libvirt]'
	touch $@

images: venv
	@for image in $(IMAGES); do $(BIN)/teelab image build $$image || exit 1; done

lint: venv
	$(BIN)/ruff check harness guest-init tests scripts
	$(BIN)/ruff format --check harness guest-init tests scripts

unit: host venv
	$(BIN)/pytest tests/unit

integration: host venv images
	$(BIN)/pytest tests/integration

bench: host venv images
	$(BIN)/teelab bench boot --image enclave -n 5
	$(BIN)/teelab bench boot --image parent -n 5

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .ruff_cache .hypothesis
