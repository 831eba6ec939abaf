// Package admin is the control socket between the running daemon and the
// stsrelay CLI: JSON over HTTP on a unix socket in the state directory,
// mode 0600. The CLI never opens the database itself, because bbolt lets only
// one process own the file (DESIGN.md decision 2).
package admin

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"time"
)

// SocketName is the control socket's file name inside the state directory.
const SocketName = "control.sock"

// maxBody bounds requests and replies; queue listings are the largest.
const maxBody = 64 << 20

// ErrNotRunning means no daemon answers on the control socket.
var ErrNotRunning = errors.New("no stsrelay daemon is running")

// Server serves a mux on the control socket.
type Server struct {
	path string
	ln   net.Listener
	http *http.Server
}

// Listen creates the socket at path, owner-only. A stale socket left by a
// crashed daemon is replaced; one that a live daemon answers on is not.
func Listen(path string, mux *http.ServeMux, logger *slog.Logger) (*Server, error) {
	if c, err := net.DialTimeout("unix", path, time.Second); err == nil {
		c.Close()
		return nil, fmt.Errorf("control socket %s: another stsrelay daemon is running", path)
	}
	if err := os.Remove(path); err != nil && !errors.Is(err, os.ErrNotExist) {
		return nil, fmt.Errorf("control socket %s: %w", path, err)
	}
	// The umask makes the socket owner-only from the start; a chmod after
	// bind would leave a window in which others could connect.
	old := syscall.Umask(0o177)
	ln, err := net.Listen("unix", path)
	syscall.Umask(old)
	if err != nil {
		return nil, fmt.Errorf("control socket: %w", err)
	}
	if logger == nil {
		logger = slog.Default()
	}
	s := &Server{
		path: path,
		ln:   ln,
		http: &http.Server{
			Handler:           http.MaxBytesHandler(mux, maxBody),
			ReadHeaderTimeout: 10 * time.Second,
			ErrorLog:          slog.NewLogLogger(logger.Handler(), slog.LevelWarn),
		},
	}
	return s, nil
}

// Serve answers requests until Close.
func (s *Server) Serve() error {
	err := s.http.Serve(s.ln)
	if errors.Is(err, http.ErrServerClosed) {
		return nil
	}
	return err
}

// Close stops the server and removes the socket.
func (s *Server) Close() error {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	err := s.http.Shutdown(ctx)
	os.Remove(s.path)
	return err
}

// WriteJSON writes v as the JSON reply with the given status.
func WriteJSON(w http.ResponseWriter, status int, v any) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(status)
	enc := json.NewEncoder(w)
	enc.SetIndent("", "  ")
	enc.Encode(v)
}

// WriteError replies with a one-line error the CLI prints as it is.
func WriteError(w http.ResponseWriter, status int, msg string) {
	WriteJSON(w, status, errorReply{Error: msg})
}

type errorReply struct {
	Error string `json:"error"`
}

// Client talks to a daemon's control socket.
type Client struct {
	path string
	http *http.Client
}

// Dial returns a client for the socket at path. It connects lazily.
func Dial(path string) *Client {
	return &Client{
		path: path,
		http: &http.Client{
			Transport: &http.Transport{
				DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
					var d net.Dialer
					return d.DialContext(ctx, "unix", path)
				},
			},
			Timeout: 5 * time.Minute,
		},
	}
}

// SocketPath returns the control socket path for a state directory.
func SocketPath(stateDir string) string { return filepath.Join(stateDir, SocketName) }

// Call sends in (if not nil) as JSON to method and path and decodes the reply
// into out (if not nil). A daemon's error reply becomes the error's text.
func (c *Client) Call(ctx context.Context, method, path string, in, out any) error {
	var body io.Reader
	if in != nil {
		b, err := json.Marshal(in)
		if err != nil {
			return err
		}
		body = bytes.NewReader(b)
	}
	req, err := http.NewRequestWithContext(ctx, method, "http://stsrelay"+path, body)
	if err != nil {
		return err
	}
	if in != nil {
		req.Header.Set("Content-Type", "application/json")
	}
	resp, err := c.http.Do(req)
	if err != nil {
		if isNoDaemon(err) {
			return fmt.Errorf("%w (no control socket answers at %s)", ErrNotRunning, c.path)
		}
		return fmt.Errorf("control socket %s: %w", c.path, err)
	}
	defer resp.Body.Close()
	data, err := io.ReadAll(io.LimitReader(resp.Body, maxBody))
	if err != nil {
		return fmt.Errorf("control socket %s: reading reply: %w", c.path, err)
	}
	if resp.StatusCode >= 300 {
		var e errorReply
		if json.Unmarshal(data, &e) == nil && e.Error != "" {
			return errors.New(e.Error)
		}
		return fmt.Errorf("daemon answered %s", resp.Status)
	}
	if out == nil {
		return nil
	}
	if err := json.Unmarshal(data, out); err != nil {
		return fmt.Errorf("control socket %s: bad reply: %w", c.path, err)
	}
	return nil
}

func isNoDaemon(err error) bool {
	return errors.Is(err, syscall.ENOENT) || errors.Is(err, syscall.ECONNREFUSED) ||
		strings.Contains(err.Error(), "no such file") || strings.Contains(err.Error(), "connection refused")
}

// ReadJSON decodes a request body into v; an empty body leaves v as it is.
func ReadJSON(r *http.Request, v any) error {
	dec := json.NewDecoder(r.Body)
	dec.DisallowUnknownFields()
	if err := dec.Decode(v); err != nil && !errors.Is(err, io.EOF) {
		return fmt.Errorf("bad request: %w", err)
	}
	return nil
}
