//go:build linux || darwin || freebsd

package admin

import (
	"fmt"
	"net"
)

// peerUID returns the user id of the process at the other end of a unix
// socket connection, as the kernel recorded it at connect.
func peerUID(c net.Conn) (int, error) {
	uc, ok := c.(*net.UnixConn)
	if !ok {
		return -1, fmt.Errorf("not a unix socket connection: %T", c)
	}
	raw, err := uc.SyscallConn()
	if err != nil {
		return -1, err
	}
	uid, credErr := -1, error(nil)
	if err := raw.Control(func(fd uintptr) { uid, credErr = socketPeerUID(int(fd)) }); err != nil {
		return -1, err
	}
	return uid, credErr
}
