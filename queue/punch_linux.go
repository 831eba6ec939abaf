package queue

import (
	"os"

	"golang.org/x/sys/unix"
)

// punchHole frees a stretch of f's blocks without changing its size or
// any other byte (fallocate(2)); reads of the stretch return zeros.
func punchHole(f *os.File, off, n int64) error {
	return unix.Fallocate(int(f.Fd()), unix.FALLOC_FL_PUNCH_HOLE|unix.FALLOC_FL_KEEP_SIZE, off, n)
}

// fdatasync flushes f's data and the metadata needed to read it back (its
// size, after an append), not its timestamps.
func fdatasync(f *os.File) error {
	return unix.Fdatasync(int(f.Fd()))
}
