package queue

import (
	"errors"
	"fmt"
	"io"
	"io/fs"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"time"
)

// spool holds message bodies beside the database: small ones in batch
// files shared by the messages of one group commit, large ones in a file
// named by their queue id. The committer syncs new files and the directory
// before it commits their records, so a committed record always has its
// body. A crash can leave a file no record refers to; load removes those.
//
// Once started, the spool keeps two chores off the group commit's path,
// which every acknowledgement waits for: it creates batch files ahead, their
// names already synced into the directory (a commit then syncs only the
// file), and it removes the files of messages that left.
type spool struct {
	dir string
	d   *os.File // the directory, for fsync

	mu      sync.Mutex
	started bool
	closed  bool
	fresh   chan *os.File  // batch files created ahead, for writeBatch
	gone    chan string    // names to remove
	removes sync.WaitGroup // removals asked for and not yet done
	quit    chan struct{}
	done    sync.WaitGroup
}

// aheadFiles is how many batch files the spool creates ahead at a time;
// one directory sync covers them.
const aheadFiles = 4

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

// start begins creating batch files ahead and removing files in the
// background. log gets what goes wrong there.
func (s *spool) start(log *slog.Logger) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.started = true
	s.fresh = make(chan *os.File, aheadFiles)
	s.gone = make(chan string, 4096)
	s.quit = make(chan struct{})
	s.done.Add(2)
	go s.makeAhead(log)
	go func() {
		defer s.done.Done()
		for name := range s.gone {
			os.Remove(s.path(name))
			s.removes.Done()
		}
	}()
}

// makeAhead creates batch files aheadFiles at a time, syncs the directory
// once for them, and hands them to writeBatch. When it cannot (a full
// disk, say), writeBatch creates its own and reports why.
func (s *spool) makeAhead(log *slog.Logger) {
	defer s.done.Done()
	for {
		var made []*os.File
		var err error
		for len(made) < aheadFiles && err == nil {
			var f *os.File
			if f, err = s.newBatchFile(); err == nil {
				made = append(made, f)
			}
		}
		if err == nil {
			err = s.syncDir()
		}
		if err != nil {
			log.Warn("queue: creating batch files ahead failed; commits create their own", "err", err)
			s.discard(made)
			select {
			case <-time.After(time.Second):
				continue
			case <-s.quit:
				return
			}
		}
		for i, f := range made {
			select {
			case s.fresh <- f:
			case <-s.quit:
				s.discard(made[i:])
				return
			}
		}
	}
}

// discard removes batch files created ahead that will not be used.
func (s *spool) discard(files []*os.File) {
	for _, f := range files {
		f.Close()
		os.Remove(f.Name())
	}
}

// idle waits for the removals asked for so far.
func (s *spool) idle() { s.removes.Wait() }

// bodyFiles lists the spool's files but for empty batch files, which
// hold no body: those created ahead.
func (s *spool) bodyFiles() ([]string, error) {
	s.idle()
	entries, err := os.ReadDir(s.dir)
	if err != nil {
		return nil, err
	}
	var names []string
	for _, e := range entries {
		if fi, err := e.Info(); err == nil && fi.Size() == 0 && strings.HasPrefix(e.Name(), batchPrefix) {
			continue
		}
		names = append(names, e.Name())
	}
	return names, nil
}

// close stops the background work, removes the files created ahead and
// not used, and closes the directory.
func (s *spool) close() error {
	s.mu.Lock()
	started := s.started && !s.closed
	s.closed = true
	s.mu.Unlock()
	if started {
		close(s.quit)
		close(s.gone)
		s.done.Wait()
		close(s.fresh)
		for f := range s.fresh {
			s.discard([]*os.File{f})
		}
	}
	return s.d.Close()
}

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
// returns it open and not yet synced, with each body's offset. newName
// says the file's name is not yet synced into the directory: it was not
// created ahead.
func (s *spool) writeBatch(bodies [][]byte) (f *os.File, offs []int64, newName bool, err error) {
	select {
	case f = <-s.fresh: // a nil channel before start: never ready; nil once closed
	default:
	}
	if f == nil {
		if f, err = s.newBatchFile(); err != nil {
			return nil, nil, false, err
		}
		newName = true
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
		return nil, nil, false, fmt.Errorf("spool file: %w", plainErr(err))
	}
	return f, offs, newName, nil
}

// newBatchFile creates an empty batch file under a new name.
func (s *spool) newBatchFile() (*os.File, error) {
	for {
		f, err := os.OpenFile(s.path(batchPrefix+newID(time.Now())), os.O_CREATE|os.O_EXCL|os.O_WRONLY, 0o600)
		switch {
		case errors.Is(err, fs.ErrExist):
			continue
		case err != nil:
			return nil, fmt.Errorf("spool file: %w", plainErr(err))
		}
		return f, nil
	}
}

// remove deletes a body file whose records are gone, in the background
// once started. A failure, or a crash first, leaves a file that the next
// start sweeps away.
func (s *spool) remove(name string) {
	s.mu.Lock()
	if s.started && !s.closed {
		s.removes.Add(1)
		select {
		case s.gone <- name:
			s.mu.Unlock()
			return
		default: // far behind: do this one here
			s.removes.Done()
		}
	}
	s.mu.Unlock()
	os.Remove(s.path(name))
}

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
