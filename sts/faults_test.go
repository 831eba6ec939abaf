package sts_test

import (
	"bytes"
	"context"
	"errors"
	"net/http"
	"runtime"
	"runtime/pprof"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/stsrelay/stsrelay/sts"
)

// Policy host faults: a host that drips its answer, one that never ends
// it, one that redirects to itself. Each fetch ends in the right result
// type, in bounded time and bytes, and leaves no goroutine behind.

// goroutinesSettle waits, a bounded time, for the goroutine count to come
// back to baseline, and fails with a dump of them if it does not.
func goroutinesSettle(t *testing.T, baseline int) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for runtime.NumGoroutine() > baseline {
		if time.Now().After(deadline) {
			var b bytes.Buffer
			pprof.Lookup("goroutine").WriteTo(&b, 1)
			t.Fatalf("%d goroutines 10s after the fetch, %d before:\n%s", runtime.NumGoroutine(), baseline, b.String())
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// drip writes s a byte at a time, each after interval, until done or the
// client goes away; it counts what went out.
func drip(w http.ResponseWriter, r *http.Request, s string, interval time.Duration, sent *atomic.Int64) {
	f := w.(http.Flusher)
	f.Flush()
	for i := 0; i < len(s); i++ {
		select {
		case <-r.Context().Done():
			return
		case <-time.After(interval):
		}
		if _, err := w.Write([]byte{s[i]}); err != nil {
			return
		}
		f.Flush()
		sent.Add(1)
	}
}

func TestFetchOfSlowDripBodyEndsAtTheFetchTimeout(t *testing.T) {
	e := newEnv(t)
	h := e.ValidHost("example.com", "id1", enforcePolicy)
	var sent atomic.Int64
	// A whole valid policy comes at once, then the rest of the mx lines
	// drip: a body cut short at the timeout must not pass for the
	// policy, or mail to the MX hosts it lacks would be refused.
	head := "version: STSv1\nmode: enforce\nmax_age: 604800\nmx: mx.example.com\n"
	rest := "mx: *.mail.example.net\n"
	h.handler = func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "text/plain")
		w.WriteHeader(http.StatusOK)
		w.Write([]byte(head))
		// Each byte well within any per-read timeout; the whole would
		// take seconds more than the fetch may.
		drip(w, r, rest, 1500*time.Millisecond, &sent)
	}
	m := e.Manager(func(o *sts.Options) { o.FetchTimeout = time.Second })
	base := runtime.NumGoroutine()
	start := time.Now()
	_, err := m.Fetch(context.Background(), "example.com")
	fe := fetchErr(t, err)
	wantResult(t, fe, sts.ResultFetchError)
	if d := time.Since(start); d > 5*time.Second {
		t.Fatalf("the fetch took %v with a 1s fetch timeout", d)
	}
	if n := sent.Load(); n >= int64(len(rest)) {
		t.Fatalf("the whole policy dripped through (%d bytes)", n)
	}
	goroutinesSettle(t, base)
}

func TestFetchOfSlowDripHeadersEndsAtTheFetchTimeout(t *testing.T) {
	e := newEnv(t)
	h := e.ValidHost("example.com", "id1", enforcePolicy)
	h.handler = func(w http.ResponseWriter, r *http.Request) {
		conn, buf, err := http.NewResponseController(w).Hijack()
		if err != nil {
			t.Error(err)
			return
		}
		defer conn.Close()
		for _, c := range []byte("HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nX-Slow: " + strings.Repeat("z", 100)) {
			conn.SetWriteDeadline(time.Now().Add(5 * time.Second))
			buf.WriteByte(c)
			if buf.Flush() != nil {
				return
			}
			time.Sleep(100 * time.Millisecond)
		}
	}
	m := e.Manager(func(o *sts.Options) { o.FetchTimeout = time.Second })
	base := runtime.NumGoroutine()
	start := time.Now()
	_, err := m.Fetch(context.Background(), "example.com")
	wantResult(t, fetchErr(t, err), sts.ResultFetchError)
	if d := time.Since(start); d > 5*time.Second {
		t.Fatalf("the fetch took %v with a 1s fetch timeout", d)
	}
	goroutinesSettle(t, base)
}

func TestFetchOfEndlessBodyStopsAtTheSizeCap(t *testing.T) {
	e := newEnv(t)
	h := e.ValidHost("example.com", "id1", enforcePolicy)
	var sent atomic.Int64
	h.handler = func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "text/plain")
		w.Write([]byte(enforcePolicy))
		line := []byte("x-padding: " + strings.Repeat("a", 1000) + "\n")
		for r.Context().Err() == nil {
			n, err := w.Write(line)
			sent.Add(int64(n))
			if err != nil {
				return
			}
		}
	}
	m := e.Manager(nil)
	base := runtime.NumGoroutine()
	_, err := m.Fetch(context.Background(), "example.com")
	fe := fetchErr(t, err)
	wantResult(t, fe, sts.ResultPolicyInvalid)
	if !strings.Contains(fe.Error(), "larger than") {
		t.Fatalf("error %q does not say the policy was too large", fe)
	}
	goroutinesSettle(t, base)
	// The cap plus what the kernel and TLS buffered on the way.
	if n := sent.Load(); n > 16<<20 {
		t.Fatalf("the host got %d bytes out before the fetch hung up", n)
	}
}

func TestFetchOfRedirectLoopMakesOneRequest(t *testing.T) {
	e := newEnv(t)
	h := e.ValidHost("example.com", "id1", enforcePolicy)
	h.handler = func(w http.ResponseWriter, r *http.Request) {
		http.Redirect(w, r, r.URL.String(), http.StatusFound) // to itself
	}
	m := e.Manager(nil)
	base := runtime.NumGoroutine()
	_, err := m.Fetch(context.Background(), "example.com")
	fe := fetchErr(t, err)
	wantResult(t, fe, sts.ResultFetchError)
	// RFC 8461 §3.3: redirects are not followed, so a loop is one request.
	if n := h.requests.Load(); n != 1 {
		t.Fatalf("%d requests, want 1", n)
	}
	if !strings.Contains(fe.Error(), "redirect") {
		t.Fatalf("error %q does not say it was a redirect", fe)
	}
	goroutinesSettle(t, base)
}

func TestFetchOfEndlessHeadersStopsAtTheHeaderCap(t *testing.T) {
	e := newEnv(t)
	h := e.ValidHost("example.com", "id1", enforcePolicy)
	h.handler = func(w http.ResponseWriter, r *http.Request) {
		conn, buf, err := http.NewResponseController(w).Hijack()
		if err != nil {
			t.Error(err)
			return
		}
		defer conn.Close()
		buf.WriteString("HTTP/1.1 200 OK\r\n")
		for {
			conn.SetWriteDeadline(time.Now().Add(5 * time.Second))
			buf.WriteString("X-More: " + strings.Repeat("h", 1000) + "\r\n")
			if buf.Flush() != nil {
				return
			}
		}
	}
	m := e.Manager(nil)
	base := runtime.NumGoroutine()
	_, err := m.Fetch(context.Background(), "example.com")
	wantResult(t, fetchErr(t, err), sts.ResultFetchError)
	goroutinesSettle(t, base)
}

func fetchErr(t *testing.T, err error) *sts.FetchError {
	t.Helper()
	var fe *sts.FetchError
	if !errors.As(err, &fe) {
		t.Fatalf("err = %v, want a *FetchError", err)
	}
	return fe
}
