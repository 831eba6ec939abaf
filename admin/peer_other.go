//go:build !linux && !darwin && !freebsd

package admin

import (
	"fmt"
	"net"
	"runtime"
)

// peerUID cannot learn who is at the other end here, so the control
// socket refuses every connection (and says why in the log) rather than
// trust the socket file's mode alone.
func peerUID(c net.Conn) (int, error) {
	return -1, fmt.Errorf("peer credentials of unix sockets are not supported on %s", runtime.GOOS)
}
