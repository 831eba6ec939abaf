// Package admin is the control socket between the running daemon and the
// stsrelay CLI: JSON over HTTP on a unix socket in the state directory,
// mode 0600. While the daemon runs, the CLI asks it rather than open the
// database, because bbolt lets only one process write the file
// (docs/DESIGN.md, "One process owns the database"). Handlers learn who
// asked from the socket's peer credentials (CallerAttrs).
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
	"os/user"
	"path/filepath"
	"strconv"
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
		ln:   ownerOnly{Listener: ln, uid: os.Geteuid(), log: logger},
		http: &http.Server{
			Handler:           http.MaxBytesHandler(mux, maxBody),
			ReadHeaderTimeout: 10 * time.Second,
			ConnContext:       withPeer,
			ErrorLog:          slog.NewLogLogger(logger.Handler(), slog.LevelWarn),
		},
	}
	return s, nil
}

// ownerOnly accepts connections from the daemon's own user and root only.
// The socket's mode already keeps others out; this still holds when the
// mode or the state directory's permissions were loosened by hand.
type ownerOnly struct {
	net.Listener
	uid int
	log *slog.Logger
}

func (l ownerOnly) Accept() (net.Conn, error) {
	for {
		c, err := l.Listener.Accept()
		if err != nil {
			return nil, err
		}
		uid, err := peerUID(c)
		switch {
		case err != nil:
			l.log.Warn("control socket: refused a connection whose user is unknown", "err", err)
		case uid != l.uid && uid != 0:
			l.log.Warn("control socket: refused a connection from another user", "uid", uid)
		default:
			return c, nil
		}
		c.Close()
	}
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

type peerKey struct{}

// withPeer records the uid of the process at the other end of c, for
// CallerAttrs.
func withPeer(ctx context.Context, c net.Conn) context.Context {
	uid, err := peerUID(c)
	if err != nil {
		return ctx
	}
	return context.WithValue(ctx, peerKey{}, uint32(uid))
}

// CallerAttrs are log attributes naming who made a request on the control
// socket: the peer's uid and, when it has one, its user name. Every
// administrative change is logged with them.
func CallerAttrs(ctx context.Context) []any {
	uid, ok := ctx.Value(peerKey{}).(uint32)
	if !ok {
		return []any{"by_uid", "unknown"}
	}
	attrs := []any{"by_uid", uid}
	if u, err := user.LookupId(strconv.FormatUint(uint64(uid), 10)); err == nil {
		attrs = append(attrs, "by_user", u.Username)
	}
	return attrs
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
				// The daemon answers within this; a body Open streams
				// (a large message into a pager) may take longer, so
				// the whole exchange is bounded in Call alone.
				ResponseHeaderTimeout: callTimeout,
			},
		},
	}
}

// callTimeout bounds a Call, and the wait for the headers of an Open
// (a variable for the tests).
var callTimeout = 5 * time.Minute

// SocketPath returns the control socket path for a state directory.
func SocketPath(stateDir string) string { return filepath.Join(stateDir, SocketName) }

// Call sends in (if not nil) as JSON to method and path and decodes the reply
// into out (if not nil). A daemon's error reply becomes the error's text.
func (c *Client) Call(ctx context.Context, method, path string, in, out any) error {
	ctx, cancel := context.WithTimeout(ctx, callTimeout)
	defer cancel()
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
	resp, err := c.do(req)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	data, err := io.ReadAll(io.LimitReader(resp.Body, maxBody+1))
	if err != nil {
		return fmt.Errorf("control socket %s: reading reply: %w", c.path, err)
	}
	if len(data) > maxBody {
		// Said as such, not as the JSON error a cut reply would give.
		return fmt.Errorf("control socket %s: reply larger than %d MiB", c.path, maxBody>>20)
	}
	if out == nil {
		return nil
	}
	if err := json.Unmarshal(data, out); err != nil {
		return fmt.Errorf("control socket %s: bad reply: %w", c.path, err)
	}
	return nil
}

// Open makes a GET request for path and returns the reply body unread, for
// replies that are not JSON and may be large (a stored message). The
// caller closes it.
func (c *Client) Open(ctx context.Context, path string) (io.ReadCloser, error) {
	req, err := http.NewRequestWithContext(ctx, "GET", "http://stsrelay"+path, nil)
	if err != nil {
		return nil, err
	}
	resp, err := c.do(req)
	if err != nil {
		return nil, err
	}
	return resp.Body, nil
}

// ErrPermission means the caller may not open the control socket.
var ErrPermission = errors.New("permission denied (run as root or the stsrelay user)")

// do sends req and turns an error reply into an error.
func (c *Client) do(req *http.Request) (*http.Response, error) {
	resp, err := c.http.Do(req)
	if err != nil {
		switch {
		case isNoDaemon(err):
			return nil, fmt.Errorf("%w (no control socket answers at %s)", ErrNotRunning, c.path)
		case errors.Is(err, syscall.EACCES) || errors.Is(err, syscall.EPERM):
			return nil, fmt.Errorf("control socket %s: %w", c.path, ErrPermission)
		}
		return nil, fmt.Errorf("control socket %s: %w", c.path, err)
	}
	if resp.StatusCode < 300 {
		return resp, nil
	}
	defer resp.Body.Close()
	data, _ := io.ReadAll(io.LimitReader(resp.Body, 64<<10))
	var e errorReply
	if json.Unmarshal(data, &e) == nil && e.Error != "" {
		return nil, &ReplyError{Status: resp.StatusCode, Msg: e.Error}
	}
	return nil, &ReplyError{Status: resp.StatusCode, Msg: "daemon answered " + resp.Status}
}

// ReplyError is the daemon's answer to a request it refused.
type ReplyError struct {
	Status int    // HTTP status: 404 for an unknown id, 409 for a needed confirmation, …
	Msg    string // one line for the user
}

func (e *ReplyError) Error() string { return e.Msg }

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
