package sdnotify

import (
	"net"
	"path/filepath"
	"regexp"
	"strconv"
	"testing"
	"time"
)

// listen plays systemd: a datagram socket at name, named in NOTIFY_SOCKET.
func listen(t *testing.T, name string) *net.UnixConn {
	t.Helper()
	conn, err := net.ListenUnixgram("unixgram", &net.UnixAddr{Name: name, Net: "unixgram"})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	t.Setenv("NOTIFY_SOCKET", name)
	return conn
}

func read(t *testing.T, conn *net.UnixConn) string {
	t.Helper()
	conn.SetReadDeadline(time.Now().Add(5 * time.Second))
	buf := make([]byte, 512)
	n, err := conn.Read(buf)
	if err != nil {
		t.Fatalf("no notification: %v", err)
	}
	return string(buf[:n])
}

func TestStatesReachTheSocket(t *testing.T) {
	conn := listen(t, filepath.Join(t.TempDir(), "notify"))
	for _, c := range []struct {
		call func() error
		want string
	}{{Ready, "READY=1"}, {Stopping, "STOPPING=1"}} {
		if err := c.call(); err != nil {
			t.Fatal(err)
		}
		if got := read(t, conn); got != c.want {
			t.Errorf("sent %q, want %q", got, c.want)
		}
	}
}

// systemd 253+ matches the READY=1 after a reload by the monotonic time
// sent with RELOADING=1; it must be now, in microseconds.
func TestReloadingCarriesTheMonotonicTime(t *testing.T) {
	conn := listen(t, filepath.Join(t.TempDir(), "notify"))
	before, _ := monotonicUsec()
	if err := Reloading(); err != nil {
		t.Fatal(err)
	}
	after, _ := monotonicUsec()
	got := read(t, conn)
	m := regexp.MustCompile(`^RELOADING=1\nMONOTONIC_USEC=(\d+)$`).FindStringSubmatch(got)
	if m == nil {
		t.Fatalf("sent %q, want RELOADING=1 and MONOTONIC_USEC", got)
	}
	us, _ := strconv.ParseInt(m[1], 10, 64)
	if us < before || us > after {
		t.Fatalf("MONOTONIC_USEC=%d, not between %d and %d", us, before, after)
	}
}

func TestAbstractSocket(t *testing.T) {
	conn := listen(t, "@stsrelay-sdnotify-test-"+strconv.FormatInt(time.Now().UnixNano(), 36))
	if err := Ready(); err != nil {
		t.Fatal(err)
	}
	if got := read(t, conn); got != "READY=1" {
		t.Fatalf("sent %q, want READY=1", got)
	}
}

func TestWithoutASocketNothingHappens(t *testing.T) {
	t.Setenv("NOTIFY_SOCKET", "")
	if err := Ready(); err != nil {
		t.Fatalf("Ready without NOTIFY_SOCKET = %v, want nil", err)
	}
}

func TestAMissingSocketIsAnError(t *testing.T) {
	t.Setenv("NOTIFY_SOCKET", filepath.Join(t.TempDir(), "gone"))
	if err := Ready(); err == nil {
		t.Fatal("Ready to a socket nobody listens on = nil, want an error")
	}
}
