package queue

import (
	"errors"
	"io"
	"os"

	"golang.org/x/sys/unix"
)

// punchHole frees a stretch of f's blocks without changing its size or
// any other byte (fallocate(2)); reads of the stretch return zeros.
func punchHole(f *os.File, off, n int64) error {
	return unix.Fallocate(int(f.Fd()), unix.FALLOC_FL_PUNCH_HOLE|unix.FALLOC_FL_KEEP_SIZE, off, n)
}

// cannotPunch reports whether a punchHole error says the file system
// cannot punch holes at all, rather than that this one failed.
func cannotPunch(err error) bool {
	return errors.Is(err, unix.EOPNOTSUPP) || errors.Is(err, unix.ENOSYS)
}

// hasData reports whether f may hold data in [off, off+n), that is, the
// stretch is not all hole (lseek(2) SEEK_DATA). When it cannot tell, it
// says yes.
func hasData(f *os.File, off, n int64) bool {
	d, err := unix.Seek(int(f.Fd()), off, unix.SEEK_DATA)
	if err == unix.ENXIO {
		return false // nothing but a hole from off to the end
	}
	return err != nil || d < off+n
}

// fdatasync flushes f's data and the metadata needed to read it back (its
// size, after an append), not its timestamps.
func fdatasync(f *os.File) error {
	return unix.Fdatasync(int(f.Fd()))
}

// iovMax is Linux's limit on the buffers of one writev(2) call.
const iovMax = 1024

// writeBuffers appends bufs to f with as few writev(2) calls as it takes:
// a group commit's bodies in one system call, not one each (os.File has no
// writev of its own, so net.Buffers would write them one by one).
func writeBuffers(f *os.File, bufs [][]byte) error {
	fd := int(f.Fd())
	for {
		for len(bufs) > 0 && len(bufs[0]) == 0 {
			bufs = bufs[1:]
		}
		if len(bufs) == 0 {
			return nil
		}
		iov := bufs[:min(len(bufs), iovMax)]
		n, err := unix.Writev(fd, iov)
		if err == unix.EINTR {
			continue
		}
		if err != nil {
			return &os.PathError{Op: "write", Path: f.Name(), Err: err}
		}
		if n == 0 {
			return &os.PathError{Op: "write", Path: f.Name(), Err: io.ErrShortWrite}
		}
		// A short write (a full disk, a signal) leaves the rest to go.
		for n > 0 {
			if n < len(bufs[0]) {
				bufs[0] = bufs[0][n:]
				break
			}
			n -= len(bufs[0])
			bufs = bufs[1:]
		}
	}
}
