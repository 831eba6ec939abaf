package main

import "io"

// runQueue is a placeholder until its issue lands; the owner replaces this file.
func runQueue(args []string, stdout, stderr io.Writer) int {
	return fail(stderr, "not implemented yet")
}
