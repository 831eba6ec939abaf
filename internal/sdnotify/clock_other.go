//go:build !linux

package sdnotify

// monotonicUsec: systemd runs on Linux only, so elsewhere nobody reads it.
func monotonicUsec() (int64, bool) { return 0, false }
