//go:build darwin || freebsd

package admin

import (
	"fmt"

	"golang.org/x/sys/unix"
)

// socketPeerUID is the peer's uid of the unix socket fd (LOCAL_PEERCRED).
func socketPeerUID(fd int) (int, error) {
	cred, err := unix.GetsockoptXucred(fd, unix.SOL_LOCAL, unix.LOCAL_PEERCRED)
	if err != nil {
		return -1, fmt.Errorf("LOCAL_PEERCRED: %w", err)
	}
	return int(cred.Uid), nil
}
