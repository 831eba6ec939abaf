package smtpin

import (
	"bytes"
	"errors"
	"io"
	"strings"
	"testing"
)

// bodyReaderRef is bodyReader as it was written first, checking a byte at
// a time: the reference that bodyReader.check must match.
type bodyReaderRef struct{ bodyReader }

func (b *bodyReaderRef) Read(p []byte) (int, error) {
	if b.err != nil {
		return 0, b.err
	}
	if b.eof {
		if b.tail == "" {
			return 0, io.EOF
		}
		n := copy(p, b.tail)
		b.tail = b.tail[n:]
		return n, nil
	}
	n, err := b.r.Read(p)
	for _, c := range p[:n] {
		if b.last == '\r' && c != '\n' {
			b.err = errBareCR
			return 0, b.err
		}
		if c == '\n' && b.last != '\r' {
			b.err = errBareLF
			return 0, b.err
		}
		if c == 0 {
			b.err = errNUL
			return 0, b.err
		}
		b.lineLen++
		if b.lineLen > b.maxLine {
			b.err = errLineTooLong
			return 0, b.err
		}
		if c == '\n' {
			b.lines++
			b.lineLen = 0
		}
		b.last = c
	}
	b.n += int64(n)
	if b.n > b.max {
		b.err = errTooLarge
		return 0, b.err
	}
	switch {
	case err == io.EOF:
		b.eof = true
		if b.last == '\r' {
			b.err = errBareCR
			return 0, b.err
		}
		if b.n > 0 && b.last != '\n' {
			b.tail = "\r\n"
		}
		if n > 0 || b.tail != "" {
			return n, nil
		}
		return 0, io.EOF
	case err != nil:
		b.err = err
		return 0, err
	}
	return n, nil
}

var errClientGone = errors.New("connection reset")

// chunkReader hands out s in chunks of the sizes given, in turn (0 is a
// read of nothing), and then end: io.EOF, or another error. With
// eofWithData the last chunk comes with end, as io.Reader allows.
type chunkReader struct {
	s           []byte
	sizes       []byte
	k           int
	end         error
	eofWithData bool
}

func (r *chunkReader) Read(p []byte) (int, error) {
	if len(r.s) == 0 {
		return 0, r.end
	}
	size := 1
	if len(r.sizes) > 0 {
		size = int(r.sizes[r.k%len(r.sizes)])
		r.k++
		if r.k > 4*len(r.sizes) && size == 0 {
			size = 1 // sizes of only zeros: still end
		}
	}
	n := copy(p[:min(size, len(p))], r.s)
	r.s = r.s[n:]
	if len(r.s) == 0 && r.eofWithData {
		return n, r.end
	}
	return n, nil
}

// FuzzBodyReaderMatchesReference feeds the same text, in the same chunks,
// to bodyReader and to the byte-wise reference, and requires the same
// result from every Read (bytes, count, error) and the same state after it
// (lines, for the error reply; n; eof; tail).
func FuzzBodyReaderMatchesReference(f *testing.F) {
	line := strings.Repeat("x", 76) + "\r\n"
	for _, seed := range []struct {
		text, sizes string
		maxLine     uint16
		max         uint32
	}{
		{"a\r\nb\r\n", "\x01", 10, 18},
		{"a\r\nb", "\x03\x01", 10, 18},
		{"a\nb\r\n", "\x02", 10, 18},
		{"a\rb\r\n", "\x02\x00\x05", 10, 18},
		{"a\r\nb\r", "\x07", 10, 18},
		{"\n", "", 10, 18},
		{strings.Repeat("x", 11) + "\r\n", "\x04", 10, 100},
		{strings.Repeat("x", 8) + "\r\n", "\x09\x01", 10, 100},
		{"x\r\r\n", "\x01", 10, 100},
		{"x\r\x00\n", "\x10", 10, 100},
		{"a\x00b\r\n", "\x03", 10, 18},
		{"12345678\r\n1234567\r\n", "\x05", 10, 18},
		{strings.Repeat(line, 60), "\xff\x13", 1000, 1 << 20},
		{"Subject: x\r\n\r\n" + strings.Repeat("y", 999) + "\r\n", "\xff", 1000, 1 << 20},
	} {
		f.Add([]byte(seed.text), []byte(seed.sizes), seed.maxLine, seed.max, uint16(4096), byte(0))
	}
	f.Fuzz(func(t *testing.T, text, sizes []byte, maxLine uint16, max uint32, bufSize uint16, flags byte) {
		bufSize = max16(bufSize%8192, 1)
		source := func() io.Reader {
			r := &chunkReader{s: text, sizes: sizes, end: io.EOF, eofWithData: flags&1 != 0}
			if flags&2 != 0 {
				r.end = errClientGone
			}
			return r
		}
		got := &bodyReader{r: source(), maxLine: int(maxLine), max: int64(max)}
		want := &bodyReaderRef{bodyReader{r: source(), maxLine: int(maxLine), max: int64(max)}}
		gotBuf, wantBuf := make([]byte, bufSize), make([]byte, bufSize)
		for call := 0; ; call++ {
			gn, gerr := got.Read(gotBuf)
			wn, werr := want.Read(wantBuf)
			if gn != wn || gerr != werr || !bytes.Equal(gotBuf[:gn], wantBuf[:wn]) {
				t.Fatalf("read %d: got %d %q, %v; reference %d %q, %v", call, gn, gotBuf[:gn], gerr, wn, wantBuf[:wn], werr)
			}
			g, w := got, &want.bodyReader
			if g.lines != w.lines || g.n != w.n || g.eof != w.eof || g.tail != w.tail || g.err != w.err {
				t.Fatalf("after read %d: got lines=%d n=%d eof=%v tail=%q err=%v; reference lines=%d n=%d eof=%v tail=%q err=%v",
					call, g.lines, g.n, g.eof, g.tail, g.err, w.lines, w.n, w.eof, w.tail, w.err)
			}
			// After an error the line state is not used; before, it carries
			// over to the next chunk and must agree.
			if g.err == nil && (g.lineLen != w.lineLen || g.last != w.last) {
				t.Fatalf("after read %d: got lineLen=%d last=%q; reference %d %q", call, g.lineLen, g.last, w.lineLen, w.last)
			}
			if gerr != nil {
				if gn, gerr2 := got.Read(gotBuf); gn != 0 || gerr2 != gerr {
					t.Fatalf("error %v did not stick: then %d, %v", gerr, gn, gerr2)
				}
				return
			}
			if call > 4*len(text)+4*len(sizes)+16 {
				t.Fatalf("no end after %d reads", call)
			}
		}
	})
}

func max16(a, b uint16) uint16 {
	if a > b {
		return a
	}
	return b
}

// BenchmarkBodyReaderByteWise is BenchmarkBodyReader on the reference, to
// compare the two in one run.
func BenchmarkBodyReaderByteWise(b *testing.B) {
	for _, bs := range benchSizes {
		b.Run(bs.name, func(b *testing.B) {
			msg := benchMessage(bs.size)
			buf := make([]byte, 8192)
			src := bytes.NewReader(msg)
			b.SetBytes(int64(len(msg)))
			b.ReportAllocs()
			for b.Loop() {
				src.Reset(msg)
				body := bodyReaderRef{bodyReader{r: src, maxLine: maxTextLine, max: 1 << 30}}
				for {
					if _, err := body.Read(buf); err != nil {
						if err != io.EOF {
							b.Fatal(err)
						}
						break
					}
				}
			}
		})
	}
}

// has8Bit finds one octet above 127 at any place, in runs of any length
// (the word-wise loops and the tail), and none in ASCII up to 0x7f.
func TestHas8BitFindsAnyHighOctet(t *testing.T) {
	for n := range 300 {
		ascii := bytes.Repeat([]byte{0x7f}, n)
		if has8Bit(ascii) {
			t.Fatalf("%d ASCII octets reported 8-bit", n)
		}
		for i := range n {
			for _, c := range []byte{0x80, 0xc3, 0xff} {
				s := bytes.Clone(ascii)
				s[i] = c
				if !has8Bit(s) {
					t.Fatalf("octet %#x at %d of %d not found", c, i, n)
				}
			}
		}
	}
}
