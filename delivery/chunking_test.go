package delivery

import (
	"bufio"
	"bytes"
	"fmt"
	"io"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/emersion/go-smtp"
)

// RFC 3030 with RFC 2920: MAIL, every RCPT and "BDAT n LAST" with the
// message go out before the first reply is read (groupMX answers nothing
// until it has the whole chunk); each recipient gets its own reply's
// status; the message goes as it is, without dot-stuffing. The connection
// then carries a second message, RSET leading its group.
func TestChunkingSendsTheMessageWithTheEnvelope(t *testing.T) {
	v, _ := oneMX(t)
	mx := &groupMX{chunking: true, rcpt: map[string]string{
		"gone@example.test":  "550 5.1.1 no such user",
		"later@example.test": "450 4.2.1 mailbox busy",
	}}
	v.route("127.0.0.2", rawServer(t, mx.serve))
	e := v.engine(func(o *Options) { o.IdleTimeout = 5 * time.Second })
	job := testJob("example.test", "a@example.test", "gone@example.test", "later@example.test", "b@example.test")
	for range 2 {
		st := deliver(t, e, job)
		wantStatus(t, st[0], 250, "2.0.0", "queued")
		wantStatus(t, st[1], 550, "5.1.1", "no such user")
		wantStatus(t, st[2], 450, "4.2.1", "mailbox busy")
		wantStatus(t, st[3], 250, "2.0.0", "queued")
	}
	conns, groups, bodies := mx.state()
	if conns != 1 {
		t.Errorf("%d connections, want 1 carrying both messages", conns)
	}
	want := []string{"MAIL FROM:<sender@sender.test> BODY=8BITMIME SIZE=" + fmt.Sprint(job.Size),
		"RCPT TO:<a@example.test>", "RCPT TO:<gone@example.test>", "RCPT TO:<later@example.test>",
		"RCPT TO:<b@example.test>", fmt.Sprintf("BDAT %d LAST", len(testBody))}
	if len(groups) != 2 || !slices.Equal(groups[0], want) || !slices.Equal(groups[1], want) {
		t.Errorf("groups %q, want twice %q", groups, want)
	}
	mx.mu.Lock()
	led := mx.rsetLed
	mx.mu.Unlock()
	if led != 1 {
		t.Errorf("%d RSETs led a group, want the second message's", led)
	}
	if len(bodies) != 2 || bodies[0] != testBody || bodies[1] != testBody {
		t.Errorf("bodies %q, want twice %q, as stored", bodies, testBody)
	}
}

// A refused BDAT is the refused end of data: every accepted recipient
// gets its reply. RSET follows (RFC 3030 §2: the transaction failed), and
// the connection carries the next message.
func TestChunkingRefusedBDATFailsTheAcceptedRecipients(t *testing.T) {
	v, _ := oneMX(t)
	mx := &groupMX{chunking: true, data: "554 5.7.1 looks like spam",
		rcpt: map[string]string{"gone@example.test": "550 5.1.1 no such user"}}
	v.route("127.0.0.2", rawServer(t, mx.serve))
	e := v.engine(func(o *Options) { o.IdleTimeout = 5 * time.Second })
	st := deliver(t, e, testJob("example.test", "a@example.test", "gone@example.test"))
	wantStatus(t, st[0], 554, "5.7.1", "looks like spam")
	wantStatus(t, st[1], 550, "5.1.1", "no such user")

	mx.mu.Lock()
	mx.data = ""
	mx.mu.Unlock()
	st = deliver(t, e, testJob("example.test", "a@example.test"))
	wantStatus(t, st[0], 250, "2.0.0", "queued")
	conns, _, bodies := mx.state()
	mx.mu.Lock()
	verbs := slices.Clone(mx.verbs)
	mx.mu.Unlock()
	if conns != 1 || len(bodies) != 1 {
		t.Errorf("%d connections, %d messages stored; want 1 and 1", conns, len(bodies))
	}
	if i := slices.Index(verbs, "MAIL"); i < 0 || i+1 >= len(verbs) || verbs[i+1] != "RSET" {
		t.Errorf("commands %q: want RSET right after the refused transaction", verbs)
	}
}

// Every RCPT refused: the refusals stand, whatever BDAT gets, and
// nothing is delivered.
func TestChunkingAllRecipientsRefused(t *testing.T) {
	v, _ := oneMX(t)
	mx := &groupMX{chunking: true, rcpt: map[string]string{
		"a@example.test": "550 5.1.1 no such user",
		"b@example.test": "451 4.3.0 try later",
	}}
	v.route("127.0.0.2", rawServer(t, mx.serve))
	st := deliver(t, v.engine(), testJob("example.test", "a@example.test", "b@example.test"))
	wantStatus(t, st[0], 550, "5.1.1", "no such user")
	wantStatus(t, st[1], 451, "4.3.0", "try later")
	if _, _, bodies := mx.state(); len(bodies) != 0 {
		t.Errorf("stored %q with no recipient", bodies)
	}
}

// A message over maxChunk, a message whose stored size understated it,
// and an engine told NoChunking all go with DATA, and arrive whole.
func TestChunkingLeavesLargeMessagesToDATA(t *testing.T) {
	large := strings.Repeat("0123456789abcdef.\r\n.", (maxChunk+4096)/20) + "\r\n"
	for _, tc := range []struct {
		name string
		body string
		size int64
		opt  func(*Options)
		verb string
	}{
		{"small", testBody, int64(len(testBody)), nil, "BDAT"},
		{"over maxChunk", large, int64(len(large)), nil, "DATA"},
		{"larger than its size said", large, 100, nil, "DATA"},
		{"NoChunking", testBody, int64(len(testBody)), noChunking, "DATA"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var cmds syncBuffer
			v, mx := oneMX(t, func(s *smtp.Server) { s.Debug = &cmds })
			var opts []func(*Options)
			if tc.opt != nil {
				opts = append(opts, tc.opt)
			}
			job := testJob("example.test", "a@example.test")
			job.Size = tc.size
			job.Open = func() (io.ReadCloser, error) { return io.NopCloser(strings.NewReader(tc.body)), nil }
			st := deliver(t, v.engine(opts...), job)
			wantStatus(t, st[0], 250, "2.0.0")
			if m := mx.messages(); len(m) != 1 || m[0].data != tc.body {
				t.Fatalf("remote stored %d messages, or not the message as queued", len(m))
			}
			sent := cmds.String()
			if !strings.Contains(sent, "\r\n"+tc.verb) || strings.Contains(sent, "\r\nBDAT") == (tc.verb == "DATA") {
				t.Errorf("the client's commands did not use %s:\n%.600s", tc.verb, sent)
			}
		})
	}
}

// What a remote receives is the same by BDAT and by DATA, for text that
// is not canonical too: a bare LF, a last line without its end, a lone
// dot, nothing at all.
func TestChunkingDeliversWhatDATADelivers(t *testing.T) {
	for _, body := range []string{
		testBody,
		"Subject: x\n\nbare LF\n.\n..two\r\nno end",
		"Subject: x\r\n\r\nends in CR\r",
		".\r\n",
		"",
	} {
		var got []string
		for _, chunking := range []bool{true, false} {
			v, mx := oneMX(t)
			job := testJob("example.test", "a@example.test")
			job.Size = int64(len(body))
			job.Open = func() (io.ReadCloser, error) { return io.NopCloser(strings.NewReader(body)), nil }
			st := deliver(t, v.engine(func(o *Options) { o.NoChunking = !chunking }), job)
			wantStatus(t, st[0], 250, "2.0.0")
			m := mx.messages()
			if len(m) != 1 {
				t.Fatalf("%q: %d messages stored", body, len(m))
			}
			got = append(got, m[0].data)
		}
		if got[0] != got[1] {
			t.Errorf("%q: by BDAT the remote got %q, by DATA %q", body, got[0], got[1])
		}
	}
}

// undot is what a remote makes of dotWriter's output: the final dot
// gone, and the dot a line begins with removed.
func undot(b []byte) []byte {
	b = bytes.TrimSuffix(b, []byte(".\r\n"))
	var out []byte
	for line := range bytes.Lines(b) {
		out = append(out, bytes.TrimPrefix(line, []byte("."))...)
	}
	return out
}

// FuzzReadChunkMatchesDotWriter: readChunk's text is what a remote gets
// from dotWriter, read in any pieces; where the text is over the limit,
// what it read so far followed by the rest gives dotWriter's output
// unchanged.
func FuzzReadChunkMatchesDotWriter(f *testing.F) {
	for _, s := range []string{testBody, "a\nb", "a\r", "\r\n.\r\n", "", ".", "x\r\r\n", "\n\n\n"} {
		f.Add([]byte(s), uint8(3), uint8(7))
	}
	f.Fuzz(func(t *testing.T, in []byte, piece, limit uint8) {
		dot := func(r io.Reader) []byte {
			var b bytes.Buffer
			w := bufio.NewWriter(&b)
			dw := newDotWriter(w)
			if _, err := io.Copy(dw, r); err != nil {
				t.Fatal(err)
			}
			dw.Close()
			return b.Bytes()
		}
		want := dot(bytes.NewReader(in))
		scratch := make([]byte, int(piece)%16+1)
		r := bytes.NewReader(in)
		text, whole, err := readChunk(nil, r, scratch, int(limit))
		if err != nil {
			t.Fatal(err)
		}
		if whole {
			if u := undot(want); !bytes.Equal(text, u) {
				t.Fatalf("readChunk %q, DATA delivers %q", text, u)
			}
			return
		}
		if len(text) <= int(limit) {
			t.Fatalf("not whole at %d bytes, limit %d", len(text), limit)
		}
		if got := dot(io.MultiReader(bytes.NewReader(text), r)); !bytes.Equal(got, want) {
			t.Fatalf("falling back to DATA sends %q, want %q", got, want)
		}
	})
}
