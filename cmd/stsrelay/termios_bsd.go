//go:build darwin || freebsd || netbsd || openbsd || dragonfly

package main

import "golang.org/x/sys/unix"

// The ioctls that read and set a terminal's modes (for hash-password).
const (
	getTermios = unix.TIOCGETA
	setTermios = unix.TIOCSETA
)
