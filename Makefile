# The commands README.md gives; .ci/run uses `make test`.
GO ?= go

.PHONY: build run test bench fuzz lint

build:
	$(GO) build -o stsrelay ./cmd/stsrelay

# Start the relay on the example configuration (state in ./var).
run:
	$(GO) run ./cmd/stsrelay serve -config config.toml.example

# The whole test suite, with the race detector; then the memory test of a
# 100,000-message queue, which -race would distort, on its own.
test:
	$(GO) test -race -timeout 20m ./...
	$(GO) test -count=1 -run 'Of100000' -v ./queue/

bench:
	$(GO) test -run '^$$' -bench . -benchtime 2s ./queue/ ./delivery/ ./sts/ ./tlsrpt/

fuzz:
	$(GO) test -run '^$$' -fuzz FuzzParse -fuzztime 60s ./sts/
	$(GO) test -run '^$$' -fuzz FuzzParseRecord -fuzztime 60s ./tlsrpt/

lint:
	gofmt -l $$(git ls-files '*.go')
	$(GO) vet ./...
	staticcheck ./...
