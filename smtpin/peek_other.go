//go:build !linux

package smtpin

import "net"

// peerClosed cannot peek here: only a failed read tells of the client's end.
func peerClosed(net.Conn) bool { return false }
