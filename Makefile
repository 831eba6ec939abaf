# The commands README.md gives; .ci/run uses `make test`.
GO ?= go

.PHONY: build run test bench fuzz lint

build:
	$(GO) build -o stsrelay ./cmd/stsrelay

# Start the relay on the example configuration (state in ./var).
run:
	$(GO) run ./cmd/stsrelay serve -config config.toml.example

# The whole test suite, with the race detector.
test:
	$(GO) test -race -timeout 20m ./...

bench:
	$(GO) test -run '^$$' -bench . -benchtime 2s ./queue/ ./delivery/ ./sts/

fuzz:
	$(GO) test -run '^$$' -fuzz FuzzParse -fuzztime 60s ./sts/

lint:
	gofmt -l $$(git ls-files '*.go')
	$(GO) vet ./...
	staticcheck ./...
