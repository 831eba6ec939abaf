package queue

import (
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"time"
)

// spool holds message bodies, one file per queue id, beside the database.
// The group commit fsyncs the new body files of a batch (in parallel, so
// the file system journals them together), then the directory, then
// commits their records, so a committed record always has its body. A crash can leave a body without a record; load
// removes those.
type spool struct {
	dir string
	d   *os.File // the directory, for fsync
}

func openSpool(dir string) (*spool, error) {
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, fmt.Errorf("cannot create spool directory %s: %w", dir, plainErr(err))
	}
	d, err := os.Open(dir)
	if err != nil {
		return nil, fmt.Errorf("cannot open spool directory %s: %w", dir, plainErr(err))
	}
	return &spool{dir: dir, d: d}, nil
}

func (s *spool) close() error { return s.d.Close() }

func (s *spool) path(id string) string { return filepath.Join(s.dir, id) }

// write stores body under a new id, reading at most limit bytes, and
// syncs the file. On error nothing is left behind.
func (s *spool) write(now time.Time, body io.Reader, limit int64) (id string, size int64, err error) {
	f, id, size, err := s.create(now, body, limit)
	if err != nil {
		return "", 0, err
	}
	err = f.Sync()
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		os.Remove(f.Name())
		return "", 0, fmt.Errorf("spool file %s: %w", f.Name(), plainErr(err))
	}
	return id, size, nil
}

// create stores body under a new id, reading at most limit bytes, and
// returns the file still open and not yet synced: the group commit syncs
// it. On error nothing is left behind.
func (s *spool) create(now time.Time, body io.Reader, limit int64) (f *os.File, id string, size int64, err error) {
	for {
		id = newID(now)
		f, err = os.OpenFile(s.path(id), os.O_CREATE|os.O_EXCL|os.O_WRONLY, 0o600)
		if !errors.Is(err, fs.ErrExist) {
			break
		}
	}
	if err != nil {
		return nil, "", 0, fmt.Errorf("spool file: %w", plainErr(err))
	}
	src := &readErr{r: io.LimitReader(body, limit+1)}
	size, err = io.Copy(f, src)
	switch {
	case src.err != nil:
		err = fmt.Errorf("reading the message: %w", src.err)
	case err != nil:
		err = fmt.Errorf("spool file: %w", plainErr(err))
	case size > limit:
		err = fmt.Errorf("%w (%d bytes)", ErrTooBig, limit)
	}
	if err != nil {
		f.Close()
		os.Remove(f.Name())
		return nil, "", 0, err
	}
	return f, id, size, nil
}

// readErr remembers a read error, to tell it from a write error.
type readErr struct {
	r   io.Reader
	err error
}

func (r *readErr) Read(p []byte) (int, error) {
	n, err := r.r.Read(p)
	if err != nil && err != io.EOF {
		r.err = err
	}
	return n, err
}

// syncDir makes new and removed names durable.
func (s *spool) syncDir() error {
	if err := s.d.Sync(); err != nil {
		return fmt.Errorf("spool directory %s: %w", s.dir, plainErr(err))
	}
	return nil
}

func (s *spool) open(id string) (io.ReadCloser, error) {
	f, err := os.Open(s.path(id))
	if errors.Is(err, fs.ErrNotExist) {
		return nil, fmt.Errorf("message %s is no longer in the queue", id)
	}
	return f, err
}

// read returns up to limit bytes of a body (all of it if limit < 0).
func (s *spool) read(id string, limit int64) ([]byte, error) {
	f, err := s.open(id)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	if limit < 0 {
		return io.ReadAll(f)
	}
	return io.ReadAll(io.LimitReader(f, limit))
}

// remove deletes a body whose record is gone. A failure leaves a file
// that the next start sweeps away.
func (s *spool) remove(id string) { os.Remove(s.path(id)) }

// sweep removes body files that no record refers to: bodies written just
// before a crash, before their record was committed.
func (s *spool) sweep(keep map[string]bool) (int, error) {
	names, err := s.d.Readdirnames(-1)
	if err != nil {
		return 0, fmt.Errorf("reading spool directory %s: %w", s.dir, err)
	}
	if _, err := s.d.Seek(0, io.SeekStart); err != nil {
		return 0, err
	}
	n := 0
	for _, name := range names {
		if !keep[name] && len(name) == idLen {
			if os.Remove(s.path(name)) == nil {
				n++
			}
		}
	}
	return n, nil
}
