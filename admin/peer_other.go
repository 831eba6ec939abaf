//go:build !linux

package admin

import (
	"net"
	"os"
)

// peerUID cannot ask the kernel here; the socket's mode (0600) alone keeps
// other users out.
func peerUID(net.Conn) (int, error) { return os.Geteuid(), nil }
