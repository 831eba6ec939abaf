package queue

import (
	"errors"
	"fmt"
	"io"
	"io/fs"
	"net"
	"os"
	"path/filepath"
	"strings"
	"time"
)

// spool holds message bodies beside the database: small ones in batch
// files shared by the messages of one group commit, large ones in a file
// named by their queue id. The committer syncs new files and the directory
// before it commits their records, so a committed record always has its
// body. A crash can leave a file no record refers to; load removes those.
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

// bodyLoc is where a body is: its own file, or a stretch of a batch file.
type bodyLoc struct {
	id, file  string // file "" means the file named id
	off, size int64
}

func locOf(m *message) bodyLoc { return bodyLoc{m.ID, m.BodyFile, m.BodyOff, m.Size} }

func (s *spool) open(l bodyLoc) (io.ReadCloser, error) {
	name := l.file
	if name == "" {
		name = l.id
	}
	f, err := os.Open(s.path(name))
	if errors.Is(err, fs.ErrNotExist) {
		return nil, fmt.Errorf("message %s is no longer in the queue", l.id)
	}
	if err != nil || l.file == "" {
		return f, err
	}
	return struct {
		io.Reader
		io.Closer
	}{io.NewSectionReader(f, l.off, l.size), f}, nil
}

// read returns up to limit bytes of a body (all of it if limit < 0).
func (s *spool) read(l bodyLoc, limit int64) ([]byte, error) {
	f, err := s.open(l)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	if limit < 0 {
		return io.ReadAll(f)
	}
	return io.ReadAll(io.LimitReader(f, limit))
}

// batchPrefix starts the names of files shared by the small bodies of one
// group commit.
const batchPrefix = "b-"

// writeBatch writes bodies one after another into a new batch file and
// returns it open and not yet synced, with each body's offset.
func (s *spool) writeBatch(bodies [][]byte) (f *os.File, offs []int64, err error) {
	for {
		f, err = os.OpenFile(s.path(batchPrefix+newID(time.Now())), os.O_CREATE|os.O_EXCL|os.O_WRONLY, 0o600)
		if !errors.Is(err, fs.ErrExist) {
			break
		}
	}
	if err != nil {
		return nil, nil, fmt.Errorf("spool file: %w", plainErr(err))
	}
	var off int64
	for _, b := range bodies {
		offs = append(offs, off)
		off += int64(len(b))
	}
	bufs := net.Buffers(bodies)
	if _, err := bufs.WriteTo(f); err != nil {
		f.Close()
		os.Remove(f.Name())
		return nil, nil, fmt.Errorf("spool file: %w", plainErr(err))
	}
	return f, offs, nil
}

// remove deletes a body file whose records are gone. A failure leaves a
// file that the next start sweeps away.
func (s *spool) remove(name string) { os.Remove(s.path(name)) }

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
		if !keep[name] && (len(name) == idLen || strings.HasPrefix(name, batchPrefix)) {
			if os.Remove(s.path(name)) == nil {
				n++
			}
		}
	}
	return n, nil
}
