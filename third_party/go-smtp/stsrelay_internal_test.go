package smtp

// Tests of stsrelay's changes to this copy of go-smtp (README.md).

import (
	"bufio"
	"bytes"
	"errors"
	"fmt"
	"io"
	"math/rand"
	"net/textproto"
	"strings"
	"testing"
)

// referenceRead is dataReader.Read as go-smtp v0.25.1 has it: byte by byte.
func referenceRead(r *dataReader, b []byte) (n int, err error) {
	if r.limited {
		if r.n <= 0 {
			return 0, ErrDataTooLarge
		}
		if int64(len(b)) > r.n {
			b = b[0:r.n]
		}
	}
	const (
		stateBeginLine = iota
		stateDot
		stateDotCR
		stateCR
		stateData
		stateEOF
	)
	for n < len(b) && r.state != stateEOF {
		var c byte
		c, err = r.r.ReadByte()
		if err != nil {
			if err == io.EOF {
				err = io.ErrUnexpectedEOF
			}
			break
		}
		switch r.state {
		case stateBeginLine:
			if c == '.' {
				r.state = stateDot
				continue
			}
			if c == '\r' {
				r.state = stateCR
				break
			}
			r.state = stateData
		case stateDot:
			if c == '\r' {
				r.state = stateDotCR
				continue
			}
			r.state = stateData
		case stateDotCR:
			if c == '\n' {
				r.state = stateEOF
				continue
			}
			r.state = stateData
		case stateCR:
			if c == '\n' {
				r.state = stateBeginLine
				break
			}
			r.state = stateData
		case stateData:
			if c == '\r' {
				r.state = stateCR
			}
		}
		b[n] = c
		n++
	}
	if err == nil && r.state == stateEOF {
		err = io.EOF
	}
	if r.limited {
		r.n -= int64(n)
	}
	return
}

// drain reads r to its end with reads of the sizes sizes gives, and
// returns what it read, the error that ended it and what is left unread.
func drain(read func([]byte) (int, error), sizes *rand.Rand, rest *bufio.Reader) (string, error, string) {
	var out []byte
	for {
		b := make([]byte, 1+sizes.Intn(64))
		n, err := read(b)
		out = append(out, b[:n]...)
		if err != nil {
			left, _ := io.ReadAll(rest)
			return string(out), err, string(left)
		}
		if n == 0 {
			left, _ := io.ReadAll(rest)
			return string(out), errors.New("no progress"), string(left)
		}
	}
}

// The reader that copies runs gives what the byte-by-byte one gives, for
// any input, any read and buffer sizes, and any size limit, and leaves the
// same bytes in the stream.
func TestDataReaderMatchesByteByByteReader(t *testing.T) {
	alphabet := []byte(".\r\nab")
	rng := rand.New(rand.NewSource(1))
	for i := 0; i < 30000; i++ {
		in := make([]byte, rng.Intn(200))
		for j := range in {
			in[j] = alphabet[rng.Intn(len(alphabet))]
		}
		if rng.Intn(2) == 0 {
			in = append(in, ".\r\nQUIT\r\n"...)
		}
		bufSize := 16 + rng.Intn(64)
		limit := int64(0)
		if rng.Intn(4) == 0 {
			limit = int64(rng.Intn(150))
		}
		seed := rng.Int63()

		fast := &dataReader{r: bufio.NewReaderSize(bytes.NewReader(in), bufSize), limited: limit > 0, n: limit}
		slow := &dataReader{r: bufio.NewReaderSize(bytes.NewReader(in), bufSize), limited: limit > 0, n: limit}
		gotOut, gotErr, gotRest := drain(fast.Read, rand.New(rand.NewSource(seed)), fast.r)
		wantOut, wantErr, wantRest := drain(func(b []byte) (int, error) { return referenceRead(slow, b) }, rand.New(rand.NewSource(seed)), slow.r)
		if gotOut != wantOut || gotErr != wantErr || gotRest != wantRest {
			t.Fatalf("input %q (buffer %d, limit %d):\n got %q, %v, rest %q\nwant %q, %v, rest %q",
				in, bufSize, limit, gotOut, gotErr, gotRest, wantOut, wantErr, wantRest)
		}
	}
}

func BenchmarkDataReader(b *testing.B) {
	line := strings.Repeat("x", 76) + "\r\n"
	msg := []byte(strings.Repeat(line, 100<<10/len(line)) + ".\r\n")
	buf := make([]byte, 32<<10)
	for _, bc := range []struct {
		name string
		read func(*dataReader, []byte) (int, error)
	}{{"runs", (*dataReader).Read}, {"byte-by-byte", referenceRead}} {
		b.Run(bc.name, func(b *testing.B) {
			b.SetBytes(int64(len(msg)))
			for i := 0; i < b.N; i++ {
				r := &dataReader{r: bufio.NewReader(bytes.NewReader(msg))}
				for {
					if _, err := bc.read(r, buf); err != nil {
						break
					}
				}
			}
		})
	}
}

// referenceLineLimitRead is lineLimitReader.Read as go-smtp v0.25.1 has it.
func referenceLineLimitRead(r *lineLimitReader, b []byte) (int, error) {
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
	for _, chr := range b[:n] {
		if chr == '\n' {
			r.curLineLength = 0
		}
		r.curLineLength++
		if r.curLineLength > r.LineLimit {
			return 0, ErrTooLongLine
		}
	}
	return n, nil
}

// The line limit measured in runs gives what the byte-by-byte one gives:
// the same bytes, the same error at the same read, for any input, read
// sizes and limit.
func TestLineLimitReaderMatchesByteByByteReader(t *testing.T) {
	alphabet := []byte("\r\nab")
	rng := rand.New(rand.NewSource(2))
	for i := 0; i < 30000; i++ {
		in := make([]byte, rng.Intn(300))
		for j := range in {
			in[j] = alphabet[rng.Intn(len(alphabet))]
		}
		limit := rng.Intn(40)
		seed := rng.Int63()
		fast := &lineLimitReader{R: bytes.NewReader(in), LineLimit: limit}
		slow := &lineLimitReader{R: bytes.NewReader(in), LineLimit: limit}
		gotOut, gotErr, _ := drain(fast.Read, rand.New(rand.NewSource(seed)), bufio.NewReader(fast.R))
		wantOut, wantErr, _ := drain(func(b []byte) (int, error) { return referenceLineLimitRead(slow, b) },
			rand.New(rand.NewSource(seed)), bufio.NewReader(slow.R))
		if gotOut != wantOut || gotErr != wantErr {
			t.Fatalf("input %q (limit %d):\n got %q, %v\nwant %q, %v", in, limit, gotOut, gotErr, wantOut, wantErr)
		}
		// And the next read after the error, as go-smtp would try it.
		if gotErr == ErrTooLongLine {
			if _, err := fast.Read(make([]byte, 8)); err != ErrTooLongLine {
				t.Fatalf("input %q (limit %d): read after the error: %v", in, limit, err)
			}
		}
	}
}

// readReply answers as textproto.Reader.ReadResponse wherever that reads
// a whole reply, and takes a bare code as a reply without text. A last
// line with another code ends the reply too, where textproto would read
// on into the next one.
func TestReadReplyMatchesTextprotoAndTakesBareCodes(t *testing.T) {
	same := []string{
		"250 ok\r\n",
		"250 \r\n",
		"250-mx.test\r\n250-\r\n250 SIZE 10\r\n",
		"550 5.1.1 no such user\r\n",
		"451-4.3.0 one\r\n451 4.3.0 two\r\n",
		"250-a\r\nstray text\r\n250 b\r\n",
		"250-a\r\n251-other code\r\n250 b\r\n",
		"25\r\n",
		"abc ok\r\n",
		"250x\r\n",
		"",
	}
	for _, in := range same {
		for _, expect := range []int{0, 2, 25, 250} {
			c1, m1, e1 := textproto.NewReader(bufio.NewReader(strings.NewReader(in + "999 next\r\n"))).ReadResponse(expect)
			c2, m2, e2 := readReply(textproto.NewReader(bufio.NewReader(strings.NewReader(in+"999 next\r\n"))), expect)
			if c1 != c2 || m1 != m2 || fmt.Sprint(e1) != fmt.Sprint(e2) {
				t.Errorf("%q (expect %d): readReply %d %q %v, textproto %d %q %v", in, expect, c2, m2, e2, c1, m1, e1)
			}
		}
	}
	for _, tc := range []struct {
		in, msg string
		code    int
	}{
		{"250\r\n", "", 250},
		{"250\n", "", 250},
		{"250-mx.test\r\n250\r\n", "mx.test\n", 250},
		{"250-\r\n250\r\n", "\n", 250},
		{"550\r\n", "", 550},
		{"250-a\r\n251 other code\r\n", "a\nother code", 251},
		{"250-a\r\n251\r\n", "a\n", 251},
	} {
		r := textproto.NewReader(bufio.NewReader(strings.NewReader(tc.in + "999 next\r\n")))
		code, msg, err := readReply(r, 0)
		if code != tc.code || msg != tc.msg || err != nil {
			t.Errorf("%q: %d %q %v, want %d %q", tc.in, code, msg, err, tc.code, tc.msg)
		}
		if next, _ := r.ReadLine(); next != "999 next" {
			t.Errorf("%q: the next reply starts %q", tc.in, next)
		}
	}
}
