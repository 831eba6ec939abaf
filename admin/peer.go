//go:build linux || darwin || freebsd

package admin

import (
	"fmt"
	"net"
)

// controlUnix runs fn on the file descriptor of a unix socket connection.
func controlUnix(c net.Conn, fn func(fd int) error) error {
	uc, ok := c.(*net.UnixConn)
	if !ok {
		return fmt.Errorf("not a unix socket connection: %T", c)
	}
	raw, err := uc.SyscallConn()
	if err != nil {
		return err
	}
	var fnErr error
	if err := raw.Control(func(fd uintptr) { fnErr = fn(int(fd)) }); err != nil {
		return err
	}
	return fnErr
}
