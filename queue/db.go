package queue

import (
	"bytes"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"syscall"
	"time"

	"go.etcd.io/bbolt"
	bolterrors "go.etcd.io/bbolt/errors"
)

// Bucket names. Other packages (sts) keep their own buckets in the same file.
var (
	bucketMessages = []byte("queue.messages") // id → JSON record
	bucketBodies   = []byte("queue.bodies")   // id 0x00 chunk(uint32 BE) → bytes
)

const chunkSize = 64 << 10

// OpenDB opens or creates the stsrelay database at path. It waits about a
// second for bbolt's file lock, then fails: the daemon owns the file
// (DESIGN.md decision 2). Errors are one line that says what to fix.
func OpenDB(path string) (*bbolt.DB, error) {
	if dir := filepath.Dir(path); dir != "" {
		if err := os.MkdirAll(dir, 0o700); err != nil {
			return nil, fmt.Errorf("cannot create state directory %s: %w", dir, plainErr(err))
		}
	}
	db, err := bbolt.Open(path, 0o600, &bbolt.Options{
		Timeout:      time.Second,
		FreelistType: bbolt.FreelistMapType, // O(1) page allocation in a large file
	})
	if err == nil {
		return db, nil
	}
	switch {
	case errors.Is(err, bolterrors.ErrTimeout):
		return nil, fmt.Errorf("another stsrelay process holds %s", path)
	case errors.Is(err, bolterrors.ErrInvalid), errors.Is(err, bolterrors.ErrVersionMismatch),
		errors.Is(err, bolterrors.ErrChecksum), errors.Is(err, bolterrors.ErrInvalidMapping):
		return nil, fmt.Errorf("%s is not a stsrelay database (%v); move it away or restore it from a backup", path, err)
	case errors.Is(err, syscall.EROFS):
		return nil, fmt.Errorf("cannot open %s: the file system is read-only; state_dir must be writable", path)
	case errors.Is(err, fs.ErrPermission):
		return nil, fmt.Errorf("cannot open %s: permission denied; state_dir must be owned by the stsrelay user", path)
	case errors.Is(err, syscall.ENOSPC):
		return nil, fmt.Errorf("cannot open %s: no space left on device", path)
	}
	// bbolt reports a file too small to hold its header as a plain error.
	return nil, fmt.Errorf("cannot open %s: %v", path, err)
}

// plainErr drops the path that *fs.PathError repeats.
func plainErr(err error) error {
	var pe *fs.PathError
	if errors.As(err, &pe) {
		return pe.Err
	}
	return err
}

// message is the stored record of one queued message.
type message struct {
	V          int // record format, 1
	ID         string
	Envelope   Envelope
	Size       int64
	Chunks     int
	Arrived    time.Time
	Recipients []recipient
}

// recipient is the delivery state of one recipient of a message.
type recipient struct {
	RecipientParams
	Domain        string
	State         State
	Attempts      int
	NextAttempt   time.Time // meaningful in StateQueued and StateDeferred
	LastAttempt   time.Time
	Last          Status
	LastMX        string // last MX host tried, kept when a later status is our own
	DelayNotified bool
}

func (r *recipient) pending() bool { return r.State == StateQueued || r.State == StateDeferred }

func (m *message) done() bool {
	for i := range m.Recipients {
		if !m.Recipients[i].State.Final() {
			return false
		}
	}
	return true
}

func getMessage(tx *bbolt.Tx, id string) (*message, error) {
	v := tx.Bucket(bucketMessages).Get([]byte(id))
	if v == nil {
		return nil, nil
	}
	m := new(message)
	if err := json.Unmarshal(v, m); err != nil {
		return nil, fmt.Errorf("message %s: damaged record: %v", id, err)
	}
	return m, nil
}

func putMessage(tx *bbolt.Tx, m *message) error {
	m.V = 1
	v, err := json.Marshal(m)
	if err != nil {
		return err
	}
	return tx.Bucket(bucketMessages).Put([]byte(m.ID), v)
}

func chunkKey(id string, n int) []byte {
	k := make([]byte, len(id)+5)
	copy(k, id)
	binary.BigEndian.PutUint32(k[len(id)+1:], uint32(n))
	return k
}

func putBody(tx *bbolt.Tx, id string, body []byte) (chunks int, err error) {
	b := tx.Bucket(bucketBodies)
	for n := 0; len(body) > 0; n++ {
		c := body[:min(len(body), chunkSize)]
		body = body[len(c):]
		if err := b.Put(chunkKey(id, n), c); err != nil {
			return 0, err
		}
		chunks = n + 1
	}
	return chunks, nil
}

// deleteMessage removes a message and its body.
func deleteMessage(tx *bbolt.Tx, id string) error {
	if err := tx.Bucket(bucketMessages).Delete([]byte(id)); err != nil {
		return err
	}
	prefix := append([]byte(id), 0)
	c := tx.Bucket(bucketBodies).Cursor()
	for k, _ := c.Seek(prefix); k != nil && bytes.HasPrefix(k, prefix); k, _ = c.Seek(prefix) {
		if err := c.Delete(); err != nil {
			return err
		}
	}
	return nil
}

// readBody copies up to limit bytes of a stored body (all of it if limit < 0).
func readBody(tx *bbolt.Tx, m *message, limit int64) ([]byte, error) {
	var buf bytes.Buffer
	b := tx.Bucket(bucketBodies)
	for n := 0; n < m.Chunks && (limit < 0 || int64(buf.Len()) < limit); n++ {
		c := b.Get(chunkKey(m.ID, n))
		if c == nil {
			return nil, fmt.Errorf("message %s: body chunk %d missing", m.ID, n)
		}
		buf.Write(c)
	}
	if limit >= 0 && int64(buf.Len()) > limit {
		buf.Truncate(int(limit))
	}
	return buf.Bytes(), nil
}

// bodyReader streams a stored body one chunk per read transaction, so a
// slow delivery never holds a transaction open (that would block the mmap
// from growing and stall every commit).
type bodyReader struct {
	db     *bbolt.DB
	id     string
	chunks int
	next   int
	buf    []byte
}

func (r *bodyReader) Read(p []byte) (int, error) {
	for len(r.buf) == 0 {
		if r.next >= r.chunks {
			return 0, io.EOF
		}
		err := r.db.View(func(tx *bbolt.Tx) error {
			c := tx.Bucket(bucketBodies).Get(chunkKey(r.id, r.next))
			if c == nil {
				return fmt.Errorf("message %s was removed from the queue during delivery", r.id)
			}
			r.buf = append(r.buf[:0], c...)
			return nil
		})
		if err != nil {
			return 0, err
		}
		r.next++
	}
	n := copy(p, r.buf)
	r.buf = r.buf[n:]
	return n, nil
}

func (r *bodyReader) Close() error { r.buf, r.next = nil, r.chunks; return nil }
