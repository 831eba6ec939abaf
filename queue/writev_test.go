package queue

import (
	"bytes"
	"context"
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

// TestWriteBuffersOfNothingSucceeds: a batch of empty bodies writes
// nothing, and that is not a short write.
func TestWriteBuffersOfNothingSucceeds(t *testing.T) {
	f, err := os.Create(filepath.Join(t.TempDir(), "seg"))
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	for _, bufs := range [][][]byte{nil, {{}}, {nil, {}, nil}} {
		if err := writeBuffers(f, bufs); err != nil {
			t.Errorf("writeBuffers(%q) = %v", bufs, err)
		}
	}
	if fi, err := f.Stat(); err != nil || fi.Size() != 0 {
		t.Errorf("the file has %d bytes (%v), want none", fi.Size(), err)
	}
}

// TestEmptyBodyIsQueued: the queue's API takes an empty message (smtpin
// never sends one: its Received header comes first).
func TestEmptyBodyIsQueued(t *testing.T) {
	tq := newTestQueue(t, newScripted(all(ok250)), Options{})
	id, err := tq.Enqueue(context.Background(), env("alice@example.com", "bob@example.org"), strings.NewReader(""))
	if err != nil {
		t.Fatal(err)
	}
	if got := tq.body(t, tq.stored(t, id)); len(got) != 0 {
		t.Errorf("body read back as %q, want nothing", got)
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
