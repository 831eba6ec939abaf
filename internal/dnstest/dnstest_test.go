package dnstest

import (
	"net"
	"testing"
)

// TestNewFindsAPortFreeForUDPAndTCP starts many servers while holding many
// TCP ports, so that the UDP port picked first is sometimes taken for TCP;
// New used to fail with "address already in use" then.
func TestNewFindsAPortFreeForUDPAndTCP(t *testing.T) {
	for range 500 {
		l, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		defer l.Close()
	}
	for range 300 {
		New(t, "example.com. 300 IN A 192.0.2.1")
	}
}
