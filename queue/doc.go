// Package queue is stsrelay's durable mail queue: it stores every accepted
// message before smtpin answers "250", hands due recipients to a Deliverer
// grouped by destination domain, retries with backoff, gives up after
// max_queue_time and sends DSNs (RFC 3464) back through itself.
//
// Envelopes and per-recipient state live in bbolt (the file main opens
// with OpenDB); bodies live in spool files in Options.Dir. One group
// commit appends the small bodies (up to 256 KiB) of everyone waiting to
// the current segment file and syncs it (with any large bodies' own files,
// and the spool directory when a file is new), then commits all their
// records in one bbolt transaction: three syncs for the whole batch. The
// space of messages that have left is punched out of their segment; a
// segment is removed with its last message once a newer one is current.
//
// Right after its commit, a message with a small body is also kept in
// memory for its first attempt at each destination domain, so that
// delivery starts without a database read or a spool open. The copies are
// bounded (16 MiB of bodies and 4096 messages in all; a message beyond
// that is read from disk) and valid only while the record is the one
// Enqueue wrote: the next commit that touches the message (an outcome or
// an operator's hold, release, bounce or delete) drops it. Retries, large
// bodies and everything after a restart read the disk, which stays the
// truth for every outcome. The queue's own reads and writes of records go
// through records, which keeps the latest ones decoded and serves one only
// when the bytes in the transaction are the ones it was made from.
//
// Why not bodies in bbolt: it was built and measured on the development VM
// (ext4, 2 vCPU). It enqueued about as fast, but bbolt reads through mmap
// and the kernel maps the body pages around every record page it touches,
// so a queue of 100,000 4 KiB messages kept the whole 680 MB file
// resident. With spool files the database holds compact records (48 MB
// for 100,000 messages) and the process stays under 100 MB. Why not one
// file per body: each needs its own fsync, and 32 concurrent writers then
// reached only 3-5x the single-writer rate; with a file shared by the
// batch they reach 6-10x. A body file also streams to the network without
// holding a bbolt transaction open, which would stall bbolt's remapping
// and every commit.
//
// The start-up scan reads every record through bbolt's mmap; it releases
// the mapping as it goes (madvise, the pages stay in the page cache), so
// a queue of 100,000 messages does not stay resident as file pages.
package queue
