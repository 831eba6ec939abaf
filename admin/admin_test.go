package admin

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

func serve(t *testing.T, mux *http.ServeMux) string {
	t.Helper()
	path := filepath.Join(t.TempDir(), SocketName)
	s, err := Listen(path, mux, nil)
	if err != nil {
		t.Fatal(err)
	}
	go s.Serve()
	t.Cleanup(func() { s.Close() })
	return path
}

func TestCallRoundTripsJSON(t *testing.T) {
	mux := http.NewServeMux()
	mux.HandleFunc("POST /echo/{word}", func(w http.ResponseWriter, r *http.Request) {
		var in struct{ N int }
		if err := ReadJSON(r, &in); err != nil {
			WriteError(w, http.StatusBadRequest, err.Error())
			return
		}
		WriteJSON(w, http.StatusOK, map[string]any{"word": r.PathValue("word"), "n": in.N + 1})
	})
	c := Dial(serve(t, mux))
	var out struct {
		Word string
		N    int
	}
	if err := c.Call(context.Background(), "POST", "/echo/hi", struct{ N int }{41}, &out); err != nil {
		t.Fatal(err)
	}
	if out.Word != "hi" || out.N != 42 {
		t.Fatalf("got %+v, want hi 42", out)
	}
}

func TestCallReturnsTheDaemonsErrorText(t *testing.T) {
	mux := http.NewServeMux()
	mux.HandleFunc("DELETE /queue/{id}", func(w http.ResponseWriter, r *http.Request) {
		WriteError(w, http.StatusNotFound, "no message with id "+r.PathValue("id"))
	})
	err := Dial(serve(t, mux)).Call(context.Background(), "DELETE", "/queue/abc", nil, nil)
	if err == nil || err.Error() != "no message with id abc" {
		t.Fatalf("err = %v, want the daemon's text", err)
	}
}

// A reply over the bound is an error that says so, not the JSON error
// of a cut reply.
func TestCallSaysWhenTheReplyIsTooLarge(t *testing.T) {
	mux := http.NewServeMux()
	mux.HandleFunc("GET /big", func(w http.ResponseWriter, r *http.Request) {
		w.Write([]byte(`["`))
		chunk := []byte(strings.Repeat("x", 1<<20))
		for range maxBody>>20 + 1 {
			w.Write(chunk)
		}
		w.Write([]byte(`"]`))
	})
	var out []string
	err := Dial(serve(t, mux)).Call(context.Background(), "GET", "/big", nil, &out)
	if err == nil || !strings.Contains(err.Error(), "reply larger than 64 MiB") {
		t.Fatalf("err = %v, want the reply named too large", err)
	}
}

// A body Open streams may take longer than a Call may (a large message
// read into a pager); only the wait for its headers is bounded.
func TestOpenStreamsLongerThanACallMayTake(t *testing.T) {
	old := callTimeout
	callTimeout = 200 * time.Millisecond
	defer func() { callTimeout = old }()
	mux := http.NewServeMux()
	mux.HandleFunc("GET /body", func(w http.ResponseWriter, r *http.Request) {
		for i := range 5 {
			fmt.Fprintf(w, "line %d\n", i)
			w.(http.Flusher).Flush()
			time.Sleep(100 * time.Millisecond)
		}
	})
	c := Dial(serve(t, mux))
	rc, err := c.Open(context.Background(), "/body")
	if err != nil {
		t.Fatal(err)
	}
	defer rc.Close()
	b, err := io.ReadAll(rc)
	if err != nil || strings.Count(string(b), "line") != 5 {
		t.Fatalf("read %q, %v; want all 5 lines", b, err)
	}
}

func TestCallSaysWhenNoDaemonRuns(t *testing.T) {
	path := filepath.Join(t.TempDir(), SocketName)
	err := Dial(path).Call(context.Background(), "GET", "/queue", nil, nil)
	if !errors.Is(err, ErrNotRunning) {
		t.Fatalf("err = %v, want ErrNotRunning", err)
	}
	if strings.Contains(err.Error(), "\n") || !strings.Contains(err.Error(), path) {
		t.Fatalf("error %q should be one line naming %s", err, path)
	}
}

func TestSocketIsOwnerOnly(t *testing.T) {
	path := serve(t, http.NewServeMux())
	fi, err := os.Stat(path)
	if err != nil {
		t.Fatal(err)
	}
	if perm := fi.Mode().Perm(); perm&0o077 != 0 {
		t.Fatalf("socket mode %o, want no group/other access", perm)
	}
}

func TestListenRefusesWhileAnotherDaemonAnswers(t *testing.T) {
	path := serve(t, http.NewServeMux())
	if _, err := Listen(path, http.NewServeMux(), nil); err == nil || !strings.Contains(err.Error(), "another stsrelay") {
		t.Fatalf("second Listen: err = %v, want refusal", err)
	}
}

func TestListenReplacesStaleSocket(t *testing.T) {
	path := filepath.Join(t.TempDir(), SocketName)
	if err := os.WriteFile(path, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	s, err := Listen(path, http.NewServeMux(), nil)
	if err != nil {
		t.Fatalf("Listen over a stale file: %v", err)
	}
	s.Close()
}
