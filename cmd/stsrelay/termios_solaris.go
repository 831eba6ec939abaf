package main

import "golang.org/x/sys/unix"

// The ioctls that read and set a terminal's modes (for hash-password).
// The file name's _solaris applies to illumos too.
const (
	getTermios = unix.TCGETS
	setTermios = unix.TCSETS
)
