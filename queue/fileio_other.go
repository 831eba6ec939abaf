//go:build !linux

package queue

import (
	"errors"
	"os"
)

// punchHole is not at hand: a segment's space comes back when it is removed.
func punchHole(*os.File, int64, int64) error { return errors.ErrUnsupported }

// cannotPunch: no hole is ever punched here.
func cannotPunch(err error) bool { return errors.Is(err, errors.ErrUnsupported) }

// hasData cannot tell holes here; nothing is punched anyway.
func hasData(*os.File, int64, int64) bool { return true }

func fdatasync(f *os.File) error { return f.Sync() }

// writeBuffers appends bufs to f, one write each.
func writeBuffers(f *os.File, bufs [][]byte) error {
	for _, b := range bufs {
		if _, err := f.Write(b); err != nil {
			return err
		}
	}
	return nil
}
