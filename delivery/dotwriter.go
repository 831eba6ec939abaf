package delivery

import (
	"bufio"
	"bytes"
)

// dotWriter writes a message as DATA sends it (RFC 5321 §4.5.2): a dot
// that begins a line is doubled, a bare LF becomes CRLF, and Close ends
// the text with CRLF "." CRLF. Its output is byte for byte that of
// net/textproto's DotWriter, which go-smtp's DATA writer uses; but where
// that one handles every byte on its own, this one copies the runs
// between line ends in one go: on a 100 KiB message it was a third of the
// relay's CPU.
type dotWriter struct {
	w     *bufio.Writer
	state int
}

const (
	dotBegin     = iota // nothing written yet
	dotBeginLine        // at the start of a line
	dotCR               // after a CR
	dotData             // inside a line
)

func newDotWriter(w *bufio.Writer) *dotWriter { return &dotWriter{w: w} }

func (d *dotWriter) Write(b []byte) (int, error) {
	n := 0
	for n < len(b) {
		if d.state == dotData {
			// The run up to the next CR or LF goes out as it is.
			rest := b[n:]
			end := bytes.IndexByte(rest, '\n')
			if end < 0 {
				end = len(rest)
			}
			if cr := bytes.IndexByte(rest[:end], '\r'); cr >= 0 {
				end = cr
			}
			if end > 0 {
				m, err := d.w.Write(rest[:end])
				n += m
				if err != nil {
					return n, err
				}
				continue
			}
		}
		c := b[n]
		switch d.state {
		case dotBegin, dotBeginLine:
			d.state = dotData
			if c == '.' {
				d.w.WriteByte('.')
			}
			if c == '\r' {
				d.state = dotCR
			}
			if c == '\n' {
				d.w.WriteByte('\r')
				d.state = dotBeginLine
			}
		case dotData:
			if c == '\r' {
				d.state = dotCR
			}
			if c == '\n' {
				d.w.WriteByte('\r')
				d.state = dotBeginLine
			}
		case dotCR:
			d.state = dotData
			if c == '\n' {
				d.state = dotBeginLine
			}
		}
		if err := d.w.WriteByte(c); err != nil {
			return n, err
		}
		n++
	}
	return n, nil
}

// Close ends the last line if it is open, writes the final dot and
// flushes. An empty text is sent as one empty line, as textproto does.
func (d *dotWriter) Close() error {
	switch d.state {
	case dotBegin, dotData:
		d.w.WriteByte('\r')
		fallthrough
	case dotCR:
		d.w.WriteByte('\n')
	}
	d.w.WriteString(".\r\n")
	return d.w.Flush()
}
