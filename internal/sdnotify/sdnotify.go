// Package sdnotify tells the service manager how the daemon is doing
// (sd_notify(3)): READY=1 once it serves, RELOADING=1 while it reloads its
// configuration, STOPPING=1 as it stops. Without $NOTIFY_SOCKET (not
// started by systemd with Type=notify) every call does nothing.
package sdnotify

import (
	"fmt"
	"net"
	"os"
	"strconv"
)

// Ready says start-up or a reload is complete.
func Ready() error { return send("READY=1") }

// Stopping says the daemon has begun to stop.
func Stopping() error { return send("STOPPING=1") }

// Reloading says a reload has begun; Ready must follow. The monotonic
// time lets systemd (253 and later) tell the READY=1 that ends this reload
// from an earlier one; without it, it may not count the reload as done.
func Reloading() error {
	state := "RELOADING=1"
	if us, ok := monotonicUsec(); ok {
		state += "\nMONOTONIC_USEC=" + strconv.FormatInt(us, 10)
	}
	return send(state)
}

// send writes one datagram to $NOTIFY_SOCKET: a path, or an abstract
// socket when it starts with '@' (which the net package maps for us).
func send(state string) error {
	name := os.Getenv("NOTIFY_SOCKET")
	if name == "" {
		return nil
	}
	conn, err := net.DialUnix("unixgram", nil, &net.UnixAddr{Name: name, Net: "unixgram"})
	if err != nil {
		return fmt.Errorf("sd_notify: %w", err)
	}
	defer conn.Close()
	if _, err := conn.Write([]byte(state)); err != nil {
		return fmt.Errorf("sd_notify %s: %w", name, err)
	}
	return nil
}
