package main

import (
	"errors"
	"strings"
	"testing"
)

// An error that reaches fail from the network cannot move the cursor,
// recolour the terminal or add a line of its own.
func TestFailEscapesWhatItPrints(t *testing.T) {
	var out strings.Builder
	err := errors.New("endpoint said \x1b[2J\x1b[31mOK\x07\nstsrelay: all good")
	if code := fail(&out, "tlsrpt send: %v", err); code != 1 {
		t.Errorf("exit code %d, want 1", code)
	}
	got := out.String()
	want := `stsrelay: tlsrpt send: endpoint said \x1b[2J\x1b[31mOK\a\nstsrelay: all good` + "\n"
	if got != want {
		t.Errorf("fail printed %q\nwant %q", got, want)
	}
}
