//go:build race

package main

// raceEnabled: the binary under test is built with the race detector too;
// tests that measure a large queue run only without it (make test's
// second pass).
const raceEnabled = true
