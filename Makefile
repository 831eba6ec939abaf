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

# Every fuzz target in the repository (func Fuzz… in a _test.go file), one
# after the other, each for FUZZTIME; new failing inputs land in the
# package's testdata/fuzz, where `make test` replays them. .ci/run uses 20s.
FUZZTIME ?= 60s
fuzz:
	@set -e; for file in $$(git grep -l '^func Fuzz' -- '*_test.go'); do \
	  dir=./$$(dirname $$file)/; \
	  for target in $$(sed -n 's/^func \(Fuzz[A-Za-z0-9_]*\)(.*/\1/p' $$file); do \
	    echo "--- fuzz $$dir $$target for $(FUZZTIME)"; \
	    $(GO) test -run '^$$' -fuzz "^$$target\$$" -fuzztime $(FUZZTIME) -fuzzminimizetime 5s $$dir 2>&1 | \
	      awk '/execs:/ { last = $$0; next } { print } END { if (last != "") print last }'; \
	    test $${PIPESTATUS[0]} -eq 0; \
	  done; \
	done

lint:
	gofmt -l $$(git ls-files '*.go')
	$(GO) vet ./...
	staticcheck ./...
