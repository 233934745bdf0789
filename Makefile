# Kiln: the two commands a fresh Debian/Ubuntu machine needs are `make up` and `make test`.
.PHONY: up down test bench deps deps-test build lint

CARGO ?= cargo

up: deps build
	bash provisioning/local.sh up

down:
	bash provisioning/local.sh down

test: deps-test
	$(CARGO) build --workspace --bins
	$(CARGO) fmt --all -- --check
	shellcheck provisioning/*.sh systemd/*.sh .ci/run
	$(CARGO) clippy --workspace --all-targets -- -D warnings
	$(CARGO) test --workspace
	bash systemd/vm-test.sh

bench: deps-test
	$(CARGO) bench -p kiln-gitstore --bench push
	$(CARGO) bench -p kiln-tests --bench preview
	$(CARGO) bench -p kiln-tests --bench versions
	$(CARGO) bench -p kiln-tests --bench load

deps:
	bash provisioning/deps.sh

deps-test:
	bash provisioning/deps.sh test

build:
	$(CARGO) build --release --workspace --bins
