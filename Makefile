# nanodist developer targets. Everything runs inside .venv, created on demand.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
TORCH_STAMP := $(VENV)/.installed-torch
PROTOS := $(wildcard protos/nanodist/v1/*.proto)

VERSION := $(shell sed -n 's/^version = "\(.*\)"/\1/p' pyproject.toml)
IMAGE := nanodist:$(VERSION)
OFFLINE_BASE := nanodist-base:bookworm
COMPOSE := $(shell docker compose version >/dev/null 2>&1 && echo "docker compose" || echo docker-compose)

.PHONY: setup proto docs certs etcd test test-fast lint demo demo-pipeline demo-torch demo-ctr bench soak bench-setup clean docker-base wheelhouse docker docker-torch up up-torch down logs \
	stack-up stack-down

setup: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

# nanodist[torch]: PyTorch is a multi-GB download, so only the targets that need it install it.
$(TORCH_STAMP): $(STAMP)
	$(BIN)/pip install --quiet -e '.[dev,torch]'
	touch $(TORCH_STAMP)

proto: $(STAMP)
	$(BIN)/python -m grpc_tools.protoc -Iprotos --python_out=protos --pyi_out=protos \
		--grpc_python_out=protos $(PROTOS)

# etcd's v3 API stubs (generated from its own protos, protos/etcd_stubs.py) and Debian's etcd-server:
# what `--store etcd://` and its tests need (docs/coordination.md).
ETCD_STUBS := protos/nanodist/etcd/rpc_pb2.py
etcd: $(ETCD_STUBS)
	command -v etcd >/dev/null || (apt-get update -qq && apt-get install -y -qq --no-install-recommends etcd-server)

$(ETCD_STUBS): $(STAMP) protos/etcd_stubs.py
	$(BIN)/python protos/etcd_stubs.py

# Development TLS material under certs/ (git ignores it): a CA, a server and a client certificate.
certs: $(STAMP)
	$(BIN)/python -m nanodist.services.common.devcerts certs

# The API reference, generated from the comments in the .proto files.
docs: $(STAMP)
	$(BIN)/python protos/apitools.py docs

# Everything, what CI runs: the docker tests (images built on first need, the three-node swarm of
# e2e-multihost included) in one stream, the rest in two more. The docker stream is the longest, and its
# work runs in containers, which dockerd starts outside this process tree: `nice` gives them the cores first.
test: $(STAMP) etcd
	@# The images build while torch installs: they are the first need of the docker stream, the longest.
	$(MAKE) -j2 $(TORCH_STAMP) test-images
	NANODIST_MULTIHOST=1 nice -n 10 $(BIN)/pytest -q -n 3 --dist loadgroup --durations=25

# The inner loop, a few minutes: unit tests and the integration tests not marked slow (no docker, no
# training runs, no Rust build).
test-fast: $(TORCH_STAMP) etcd
	$(BIN)/pytest -q -n 3 -m "not slow" tests/unit tests/integration --durations=10

# The whole cluster as local processes: 2 parameter-server shards, barrier, lock,
# an MPI group and a TCP group of 2 workers each, training on scikit-learn's digits.
demo: $(STAMP)
	$(BIN)/nanodist up

# The same cluster, each group one replica of a 2-stage pipeline (2 stages x 2 replicas).
demo-pipeline: $(STAMP)
	$(BIN)/nanodist up --pipeline-stages 2 --hidden 128,64

# mypy cannot follow package-dir, so it checks the package through a tree of links that mirrors it.
TYPECHECK := $(VENV)/typecheck/nanodist

# examples/digits_cnn.py, a PyTorch CNN, on the same 4 workers through `nanodist run`.
demo-torch: $(TORCH_STAMP)
	$(BIN)/nanodist run --groups mpi:2,tcp:2 examples/digits_cnn.py

# A click-through-rate model whose embedding tables live on the parameter servers (under a minute).
demo-ctr: $(TORCH_STAMP)
	$(BIN)/nanodist run --groups tcp:2 examples/ctr.py --samples 200000 --evaluations 2

lint: $(TORCH_STAMP) $(ETCD_STUBS)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	rm -rf $(TYPECHECK) && mkdir -p $(TYPECHECK)
	ln -s $(CURDIR)/protos/nanodist/* $(CURDIR)/services $(CURDIR)/client $(CURDIR)/workers $(TYPECHECK)/
	ln -s $(CURDIR)/workers/torch $(TYPECHECK)/torch
	$(BIN)/mypy
	$(BIN)/mypy protos/apitools.py

# The anchors need torch, redis-py and Debian's redis-server; a missing one is reported as skipped.
bench: $(TORCH_STAMP)
	$(BIN)/python bench/ps_throughput.py
	$(BIN)/python bench/coordination.py
	$(BIN)/python bench/allreduce.py
	$(BIN)/python bench/tls_cost.py
	$(BIN)/python bench/step_time.py
	$(BIN)/python bench/durability.py
	$(BIN)/python bench/tensor_sharding.py
	$(BIN)/python bench/pipeline.py
	$(BIN)/python bench/torch_step.py
	$(BIN)/python bench/embedding_step.py
	$(BIN)/python bench/recovery.py

# 64 clients for 60 s against 2 shards, barrier and lock: zero errors, zero lost updates, bounded memory.
soak: $(STAMP)
	$(BIN)/python bench/soak.py

bench-setup: $(STAMP)
	$(BIN)/pip install --quiet -e '.[dev,bench]'
	command -v redis-server >/dev/null || (apt-get update -qq && apt-get install -y -qq redis-server)

# Containers. `make docker` uses python:3.11-slim when it can be pulled, otherwise
# the offline path: a debootstrapped Debian base and a wheelhouse filled on this host.
docker-base:
	bash docker/build-base.sh $(OFFLINE_BASE)

wheelhouse: $(STAMP) $(ETCD_STUBS)
	bash docker/wheelhouse.sh

# Sets $$base: python:3.11-slim when it can be pulled, otherwise the offline base.
PICK_BASE = if docker image inspect python:3.11-slim >/dev/null 2>&1 || docker pull -q python:3.11-slim >/dev/null 2>&1; \
	then base=python:3.11-slim; else $(MAKE) docker-base && base=$(OFFLINE_BASE); fi

docker: wheelhouse
	$(PICK_BASE); \
	echo "building $(IMAGE) on $$base"; \
	docker build -q -f docker/Dockerfile --build-arg BASE_IMAGE=$$base -t $(IMAGE) .

# The image variant with nanodist[torch] and examples/, for workers that run PyTorch scripts.
# TORCH_INDEX_URL: a wheel index to install torch from instead of PyPI's default (CUDA) build,
# such as one of CPU-only wheels, for a much smaller image (the build then needs that index).
TORCH_IMAGE := $(IMAGE)-torch
TORCH_INDEX_URL ?=
# The build's own context: .dockerignore keeps the extra's GBs of wheels out of every other build.
TORCH_CONTEXT := pyproject.toml README.md protos services client workers examples docker/Dockerfile \
	docker/wheelhouse docker/wheelhouse-extras

docker-torch: wheelhouse
	TORCH_INDEX_URL='$(TORCH_INDEX_URL)' bash docker/wheelhouse.sh torch
	$(PICK_BASE); \
	echo "building $(TORCH_IMAGE) on $$base"; \
	tar -c --exclude=__pycache__ --exclude='*.pyc' --exclude='*.egg-info' $(TORCH_CONTEXT) \
	| docker build -q -f docker/Dockerfile --build-arg BASE_IMAGE=$$base --build-arg EXTRAS=torch \
		--build-arg TORCH_INDEX_URL='$(TORCH_INDEX_URL)' -t $(TORCH_IMAGE) -
	docker image ls $(TORCH_IMAGE)

up: docker
	mkdir -p runs
	$(COMPOSE) up -d
	$(COMPOSE) ps

down:
	$(COMPOSE) down -v --remove-orphans

logs:
	$(COMPOSE) logs -f

# The same cluster on Docker Swarm (docker-stack.yml; docs/deploy.md). An engine in no swarm starts
# a single-node one (`docker swarm leave --force` ends it). The shards and the lock service keep
# their state on local volumes, so they run on nodes labelled for them: with no labelled node,
# this one gets the labels. A swarm spans hosts, so the stack has mutual TLS and tokens unless
# STACK_TLS=off (plaintext, unauthenticated) says otherwise; the certificates come from `make certs`.
STACK ?= nanodist
STACK_TLS ?= on
STACK_FILES ?= -c docker-stack.yml $(if $(filter off,$(STACK_TLS)),,-c docker-stack.tls.yml)
STATE_LABELS := nanodist.ps-0 nanodist.ps-1 nanodist.lock

stack-up: docker $(if $(filter off,$(STACK_TLS)),,certs/ca.pem)
	@[ "$$(docker info --format '{{.Swarm.LocalNodeState}}')" = active ] || docker swarm init
	@docker node ls -q --filter node.label=nanodist.ps-0 | grep -q . \
	|| docker node update $(foreach l,$(STATE_LABELS),--label-add $(l)=true) "$$(docker info --format '{{.Swarm.NodeID}}')"
	docker stack deploy --resolve-image never $(STACK_FILES) $(STACK)
	docker stack services $(STACK)

certs/ca.pem:
	$(MAKE) certs

# `docker stack rm` returns before the containers are gone and keeps the volumes: wait, then remove them.
stack-down:
	docker stack rm $(STACK)
	@while docker ps -aq --filter label=com.docker.stack.namespace=$(STACK) | grep -q .; do sleep 1; done
	docker volume ls -q --filter label=com.docker.stack.namespace=$(STACK) | xargs -r docker volume rm

# examples/digits_cnn.py as worker containers (a TCP group of 2, an MPI group of 2) against the same services.
up-torch: docker docker-torch
	mkdir -p runs
	$(COMPOSE) -f docker-compose.yml -f docker-compose.torch.yml up -d
	$(COMPOSE) -f docker-compose.yml -f docker-compose.torch.yml ps

# docker-stack.yml on a swarm of three docker-in-docker nodes made on this machine and removed after
# (tests/e2e/test_multihost.py): training across the nodes, then a node killed mid-run. 2-4 minutes
# once the images exist; make test runs it too, this target alone. Never touches this engine's own swarm.
.PHONY: e2e-multihost e2e-torch docker-node test-images
e2e-multihost: docker-base docker docker-node
	NANODIST_MULTIHOST=1 $(BIN)/pytest -s -q tests/e2e/test_multihost.py

# docker-compose.torch.yml's worker containers train examples/digits_cnn.py (tests/e2e/test_compose_torch.py);
# make test skips it, as the torch image alone takes about 10 minutes to build here.
e2e-torch: $(TORCH_STAMP)
	NANODIST_E2E_TORCH=1 $(BIN)/pytest -s -q tests/e2e/test_compose_torch.py

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info

# The docker-in-docker node of e2e-multihost: Debian's docker.io on the offline base, with only its two
# files as the build context (cached after the first build).
NODE_IMAGE := nanodist-node:bookworm
docker-node: docker-base
	tar -c -C docker node.Dockerfile node-entrypoint.sh | docker build --quiet --file=node.Dockerfile \
		--build-arg BASE_IMAGE=$(OFFLINE_BASE) --tag $(NODE_IMAGE) -

# Every image make test's docker stream needs, one build after another (two would fill one wheelhouse).
test-images: docker
	$(MAKE) docker-node
