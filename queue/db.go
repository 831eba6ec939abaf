package queue

import (
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"syscall"
	"time"

	"go.etcd.io/bbolt"
	bolterrors "go.etcd.io/bbolt/errors"
)

// bucketMessages maps queue id → JSON record. Other packages (sts) keep
// their own buckets in the same file.
var bucketMessages = []byte("queue.messages")

// OpenDB opens or creates the stsrelay database at path. It waits about a
// second for bbolt's file lock, then fails: the daemon owns the file
// (docs/DESIGN.md, "One process owns the database"). Errors are one line
// that says what to fix.
func OpenDB(path string) (*bbolt.DB, error) {
	_, dirErr := os.Stat(filepath.Dir(path))
	_, fileErr := os.Stat(path)
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
		// A file (and a state directory) made now: their entries must
		// outlive a crash with the commits synced into them.
		var dirs []string
		if errors.Is(fileErr, fs.ErrNotExist) {
			dirs = append(dirs, filepath.Dir(path))
		}
		if errors.Is(dirErr, fs.ErrNotExist) {
			dirs = append(dirs, filepath.Dir(filepath.Dir(path)))
		}
		for _, dir := range dirs {
			if err := syncDir(dir); err != nil {
				db.Close()
				return nil, fmt.Errorf("cannot sync %s: %w", dir, plainErr(err))
			}
		}
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

// ErrNoDatabase is returned by OpenReadOnly when there is no database
// file: no daemon has run with this state directory yet.
var ErrNoDatabase = errors.New("no queue database")

// ErrLocked is returned by OpenReadOnly when a process holds the
// database for writing: a daemon is running (or starting).
var ErrLocked = errors.New("the database is locked by a running stsrelay daemon")

// OpenReadOnly opens the database at path for reading while no daemon
// runs. bbolt takes a shared lock, so a daemon that starts meanwhile waits
// for it (up to OpenDB's second) and never changes the file under a
// reader.
func OpenReadOnly(path string) (*bbolt.DB, error) {
	if _, err := os.Stat(path); errors.Is(err, fs.ErrNotExist) {
		return nil, fmt.Errorf("%s: %w", path, ErrNoDatabase)
	}
	db, err := bbolt.Open(path, 0o600, &bbolt.Options{ReadOnly: true, Timeout: time.Second})
	switch {
	case err == nil:
		return db, nil
	case errors.Is(err, bolterrors.ErrTimeout):
		return nil, fmt.Errorf("%s: %w", path, ErrLocked)
	case errors.Is(err, fs.ErrPermission):
		return nil, fmt.Errorf("cannot read %s: %w", path, fs.ErrPermission)
	case errors.Is(err, bolterrors.ErrInvalid), errors.Is(err, bolterrors.ErrVersionMismatch),
		errors.Is(err, bolterrors.ErrChecksum):
		return nil, fmt.Errorf("%s is not a stsrelay database (%v)", path, err)
	}
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
	ID       string
	Envelope Envelope
	Size     int64
	// BodyFile names the spool file that holds the body from BodyOff on,
	// when it is shared with other messages of one group commit; "" means
	// the file named ID holds only this body.
	BodyFile   string
	BodyOff    int64
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
	// ResumeAt is the attempt the retry schedule had planned when an
	// operator asked for a retry now; a failed manual retry goes back to
	// it, so the schedule goes on as if the retry had not happened.
	ResumeAt time.Time
	// Skipped counts the failed manual retries, which do not advance the
	// retry schedule.
	Skipped int
	// NoticeOwed is the Action of a DSN owed to the sender about this
	// recipient (failed, delayed, relayed) and not queued yet: its body
	// could not be written, or the process stopped first. The message
	// stays in the queue until it is.
	NoticeOwed string
}

func (r *recipient) pending() bool { return r.State == StateQueued || r.State == StateDeferred }

// done reports whether nothing is left to do for m: every recipient is
// final and no DSN is owed about any of them.
func (m *message) done() bool {
	for i := range m.Recipients {
		if r := &m.Recipients[i]; !r.State.Final() || r.NoticeOwed != "" {
			return false
		}
	}
	return true
}

// owesNotice reports whether a DSN is owed about any recipient of m.
func (m *message) owesNotice() bool {
	for i := range m.Recipients {
		if m.Recipients[i].NoticeOwed != "" {
			return true
		}
	}
	return false
}

// getMessage reads the record of id from tx, nil if there is none. It
// decodes every time: the queue's own reads and writes go through
// Queue.recs, which keeps the latest records decoded.
func getMessage(tx *bbolt.Tx, id string) (*message, error) {
	v := tx.Bucket(bucketMessages).Get([]byte(id))
	if v == nil {
		return nil, nil
	}
	return decodeRecord(id, v)
}

func decodeRecord(id string, v []byte) (*message, error) {
	m, err := decodeMessage(v)
	if err != nil {
		return nil, fmt.Errorf("message %s: damaged record: %v", id, err)
	}
	return m, nil
}

// syncDir flushes dir's entries (files and directories made in it) to
// disk.
func syncDir(dir string) error {
	d, err := os.Open(dir)
	if err != nil {
		return err
	}
	defer d.Close()
	return d.Sync()
}
