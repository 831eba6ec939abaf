package smtp

import (
	"bytes"
	"errors"
	"io"
)

var ErrTooLongLine = errors.New("smtp: too long a line in input stream")

// lineLimitReader reads from the underlying Reader but restricts
// line length of lines in input stream to a certain length.
//
// If line length exceeds the limit - Read returns ErrTooLongLine
type lineLimitReader struct {
	R         io.Reader
	LineLimit int

	curLineLength int
}

func (r *lineLimitReader) Read(b []byte) (int, error) {
	if r.curLineLength > r.LineLimit && r.LineLimit > 0 {
		return 0, ErrTooLongLine
	}

	n, err := r.R.Read(b)
	if err != nil {
		return n, err
	}

	if r.LineLimit == 0 {
		return n, nil
	}

	// stsrelay: measure the lines between LFs in runs instead of byte by
	// byte; the same outcome, and the same length carried to the next read
	// (an LF counts towards the line it starts, as before).
	for rest := b[:n]; ; {
		i := bytes.IndexByte(rest, '\n')
		if i < 0 {
			r.curLineLength += len(rest)
		} else {
			r.curLineLength += i
		}
		if r.curLineLength > r.LineLimit {
			r.curLineLength = r.LineLimit + 1
			return 0, ErrTooLongLine
		}
		if i < 0 {
			return n, nil
		}
		r.curLineLength = 1
		rest = rest[i+1:]
	}
}
