# The commands README.md gives; .ci/run uses `make test`.
GO ?= go

.PHONY: build run test bench fuzz lint

build:
	$(GO) build -o stsrelay ./cmd/stsrelay

# Start the relay on the example configuration (state in ./var).
run:
	$(GO) run ./cmd/stsrelay serve -config config.toml.example

# The whole test suite, with the race detector; then the tests of a
# 100,000-message queue (memory, paging through the daemon), which -race
# would distort or slow down, on their own.
test:
	$(GO) test -race -timeout 20m ./...
	$(GO) test -count=1 -timeout 20m -run 'Of100000' -v ./queue/ ./cmd/stsrelay/

bench:
	$(GO) test -run '^$$' -bench . -benchtime 2s ./queue/ ./delivery/ ./sts/ ./tlsrpt/

fuzz:
	$(GO) test -run '^$$' -fuzz FuzzParse -fuzztime 60s ./sts/
	$(GO) test -run '^$$' -fuzz FuzzParseRecord -fuzztime 60s ./tlsrpt/

lint:
	gofmt -l $$(git ls-files '*.go')
	$(GO) vet ./...
	staticcheck ./...
