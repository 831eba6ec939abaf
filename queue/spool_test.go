package queue

import (
	"os"
	"path/filepath"
	"testing"
	"time"
)

// waitAhead waits until the spool has batch files created ahead.
func waitAhead(t *testing.T, s *spool) {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for len(s.fresh) == 0 {
		if time.Now().After(deadline) {
			t.Fatal("no batch file created ahead within 5s")
		}
		time.Sleep(time.Millisecond)
	}
}

// A group commit of small bodies takes a batch file created ahead, whose
// name is already synced: it syncs the file but not the directory. The
// body is there after a restart.
func TestBatchFileCreatedAheadNeedsNoDirectorySync(t *testing.T) {
	path := filepath.Join(t.TempDir(), "stsrelay.db")
	tq := openTestQueue(t, path, newScripted(all(ok250)), Options{})
	waitAhead(t, tq.spool)
	before := tq.commit.dirSyncs.Load()
	id := tq.enqueue(t, env("alice@example.com", "bob@example.org"))
	if n := tq.commit.dirSyncs.Load() - before; n != 0 {
		t.Errorf("the commit synced the directory %d times, want 0", n)
	}
	tq.Close()
	tq.db.Close()
	d := newScripted(all(ok250))
	tq = openTestQueue(t, path, d, Options{})
	tq.run(t)
	tq.waitJobs(t, 1)
	tq.settle(t)
	d.mu.Lock()
	defer d.mu.Unlock()
	if len(d.jobs) != 1 || d.jobs[0].ID != id || len(d.bodies) != 1 || d.bodies[0] != testBody {
		t.Fatalf("after a restart delivered %d jobs, bodies %q; want %s with its body", len(d.jobs), d.bodies, id)
	}
}

// Files created ahead are no messages' bodies: Close removes those not
// taken, and a start sweeps away those a crash left.
func TestBatchFilesCreatedAheadLeaveNothingBehind(t *testing.T) {
	path := filepath.Join(t.TempDir(), "stsrelay.db")
	tq := openTestQueue(t, path, newScripted(all(ok250)), Options{})
	waitAhead(t, tq.spool)
	if names, err := tq.spool.bodyFiles(); err != nil || len(names) != 0 {
		t.Fatalf("body files %v (%v), want none: files created ahead are not bodies", names, err)
	}
	// A crash: the queue is gone without Close, its files ahead stay.
	crashed, err := os.ReadDir(tq.opts.Dir)
	if err != nil || len(crashed) == 0 {
		t.Fatalf("spool holds %v (%v), want the files created ahead", crashed, err)
	}
	tq.commit.close()
	tq.db.Close()
	tq2 := openTestQueue(t, path, newScripted(all(ok250)), Options{})
	for _, e := range crashed {
		if _, err := os.Stat(filepath.Join(tq2.opts.Dir, e.Name())); err == nil {
			t.Errorf("%s, created ahead before the crash, survived the start", e.Name())
		}
	}
	tq2.Close()
	if left, err := os.ReadDir(tq2.opts.Dir); err != nil || len(left) != 0 {
		t.Fatalf("after Close the spool holds %v (%v), want nothing", left, err)
	}
}
