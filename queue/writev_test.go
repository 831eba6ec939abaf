package queue

import (
	"bytes"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// TestWriteBuffersAppendsEveryBufferInOrder: more buffers than one writev
// takes, empty ones among them, after what the file already holds.
func TestWriteBuffersAppendsEveryBufferInOrder(t *testing.T) {
	path := filepath.Join(t.TempDir(), "seg")
	f, err := os.OpenFile(path, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o600)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if _, err := f.WriteString("before|"); err != nil {
		t.Fatal(err)
	}
	var bufs [][]byte
	want := []byte("before|")
	for i := range 2500 {
		b := []byte(fmt.Sprintf("body %d;", i))
		if i%7 == 0 {
			b = nil
		}
		bufs = append(bufs, b)
		want = append(want, b...)
	}
	orig := bytes.Join(bufs, nil)
	if err := writeBuffers(f, bufs); err != nil {
		t.Fatal(err)
	}
	got, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got, want) {
		t.Fatalf("file holds %d bytes, want %d (first difference at %d)", len(got), len(want), firstDiff(got, want))
	}
	if !bytes.Equal(bytes.Join(bufs, nil), orig) {
		t.Error("writeBuffers changed the bytes its caller passed")
	}
}

func TestWriteBuffersNamesTheFileOnError(t *testing.T) {
	path := filepath.Join(t.TempDir(), "seg")
	if err := os.WriteFile(path, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	f, err := os.Open(path) // read-only: write(2) fails with EBADF
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	err = writeBuffers(f, [][]byte{[]byte("a"), []byte("b")})
	if err == nil || !strings.Contains(err.Error(), path) {
		t.Fatalf("err = %v, want one naming %s", err, path)
	}
}

func firstDiff(a, b []byte) int {
	for i := range min(len(a), len(b)) {
		if a[i] != b[i] {
			return i
		}
	}
	return min(len(a), len(b))
}
