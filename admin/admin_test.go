package admin

import (
	"context"
	"errors"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"testing"
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
