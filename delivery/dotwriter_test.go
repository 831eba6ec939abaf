package delivery

import (
	"bufio"
	"bytes"
	"math/rand/v2"
	"net/textproto"
	"testing"
)

// dotStuff writes chunks through w's dot-stuffing and returns the bytes.
func dotStuff(chunks [][]byte, fast bool) []byte {
	var out bytes.Buffer
	bw := bufio.NewWriterSize(&out, 64)
	var w interface {
		Write([]byte) (int, error)
		Close() error
	}
	if fast {
		w = newDotWriter(bw)
	} else {
		w = textproto.NewWriter(bw).DotWriter()
	}
	for _, c := range chunks {
		w.Write(c)
	}
	w.Close()
	return out.Bytes()
}

// The chunked writer must send exactly what net/textproto's does (and so
// go-smtp's DATA writer on the lock-step path), whatever the line ends
// and wherever the writes split the text.
func TestDotWriterMatchesTextproto(t *testing.T) {
	cases := []string{"", ".", "\r\n", "\n", "\r", ".\r\n", "..\r\n.", "a\r\n.b\r\n..c\n.d\re\r\r\n.",
		"Subject: x\r\n\r\n.leading\r\nend", "no newline at the end", "\n\n.\n..\n", "\r\r\n\r.\r\n"}
	for _, c := range cases {
		if got, want := dotStuff([][]byte{[]byte(c)}, true), dotStuff([][]byte{[]byte(c)}, false); !bytes.Equal(got, want) {
			t.Errorf("%q: got %q, want %q", c, got, want)
		}
	}
	// Random texts over the bytes that matter, split at random points.
	r := rand.New(rand.NewPCG(1, 2))
	alphabet := []byte("ab.\r\n")
	for range 2000 {
		text := make([]byte, r.IntN(200))
		for i := range text {
			text[i] = alphabet[r.IntN(len(alphabet))]
		}
		var chunks [][]byte
		for rest := text; len(rest) > 0; {
			n := 1 + r.IntN(len(rest))
			chunks = append(chunks, rest[:n])
			rest = rest[n:]
		}
		if got, want := dotStuff(chunks, true), dotStuff(chunks, false); !bytes.Equal(got, want) {
			t.Fatalf("%q in %d chunks: got %q, want %q", text, len(chunks), got, want)
		}
	}
}

func FuzzDotWriterMatchesTextproto(f *testing.F) {
	f.Add([]byte("a\r\n.b\n..c\r"), uint8(3))
	f.Fuzz(func(t *testing.T, text []byte, split uint8) {
		at := int(split) % (len(text) + 1)
		chunks := [][]byte{text[:at], text[at:]}
		if got, want := dotStuff(chunks, true), dotStuff(chunks, false); !bytes.Equal(got, want) {
			t.Fatalf("%q split at %d: got %q, want %q", text, at, got, want)
		}
	})
}

func BenchmarkDotWriter(b *testing.B) {
	line := bytes.Repeat([]byte("x"), 76)
	var msg []byte
	for len(msg) < 100<<10 {
		msg = append(append(msg, line...), '\r', '\n')
	}
	for _, fast := range []bool{false, true} {
		name := "textproto"
		if fast {
			name = "chunked"
		}
		b.Run(name, func(b *testing.B) {
			b.SetBytes(int64(len(msg)))
			bw := bufio.NewWriterSize(discard{}, 16<<10)
			for b.Loop() {
				var w interface {
					Write([]byte) (int, error)
					Close() error
				}
				if fast {
					w = newDotWriter(bw)
				} else {
					w = textproto.NewWriter(bw).DotWriter()
				}
				for rest := msg; len(rest) > 0; rest = rest[min(len(rest), 32<<10):] {
					w.Write(rest[:min(len(rest), 32<<10)])
				}
				w.Close()
			}
		})
	}
}

type discard struct{}

func (discard) Write(p []byte) (int, error) { return len(p), nil }
