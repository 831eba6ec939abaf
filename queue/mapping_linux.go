package queue

import (
	"os"
	"syscall"

	"go.etcd.io/bbolt"
)

// releaseMapping drops this process's mapping of the database pages, as
// after the start-up scan, which reads every record once: bbolt reads
// through mmap, so a queue of 100,000 deferred messages otherwise stays
// resident as some 100 MB of file pages the relay does not need again.
// The pages stay in the page cache; bbolt's next read of one maps it back
// (madvise(2): MADV_DONTNEED on a shared file mapping loses nothing, and
// slices into the mapping stay valid). It must not race bbolt remapping
// the file: the scan runs before the committer starts.
func releaseMapping(db *bbolt.DB) {
	fi, err := os.Stat(db.Path())
	if err != nil || fi.Size() == 0 {
		return
	}
	// The mapping is at least the file's size (bbolt maps ahead of it).
	syscall.Syscall(syscall.SYS_MADVISE, db.Info().Data, uintptr(fi.Size()), syscall.MADV_DONTNEED)
}
