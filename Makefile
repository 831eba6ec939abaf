# The commands README.md gives; .ci/run uses `make test`.
GO ?= go
SHELL := /bin/bash

.PHONY: build run test bench fuzz lint

build:
	$(GO) build -o stsrelay ./cmd/stsrelay

# Start the relay on the example configuration (state in ./var).
run:
	$(GO) run ./cmd/stsrelay serve -config config.toml.example

# The whole test suite, with the race detector, and that of the patched
# go-smtp the build uses (third_party/go-smtp); then the tests of a
# 100,000-message queue (memory, paging through the daemon), which -race
# would distort or slow down, on their own.
test:
	$(GO) test -race -timeout 20m ./... github.com/emersion/go-smtp
	$(GO) test -count=1 -timeout 20m -run 'Of100000' -v ./queue/ ./cmd/stsrelay/

bench:
	$(GO) test -run '^$$' -bench . -benchtime 2s ./queue/ ./delivery/ ./sts/ ./tlsrpt/

# Every fuzz target in the repository, one after the other, each for
# FUZZTIME; new failing inputs land in the package's testdata/fuzz, where
# `make test` replays them. .ci/run uses 20s. The loop is .ci/fuzz.
FUZZTIME ?= 60s
fuzz:
	GO=$(GO) FUZZTIME=$(FUZZTIME) .ci/fuzz

lint:
	gofmt -l $$(git ls-files '*.go')
	$(GO) vet ./...
	staticcheck ./...
