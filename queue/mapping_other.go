//go:build !linux

package queue

import "go.etcd.io/bbolt"

// releaseMapping is a no-op where madvise is not at hand.
func releaseMapping(*bbolt.DB) {}
