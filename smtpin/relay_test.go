package smtpin

import (
	"bufio"
	"crypto/tls"
	"net/netip"
	"strings"
	"testing"
)

// The open-relay matrix of the package documentation (and README's
// security section): every combination of trusted network, AUTH and TLS,
// on the STARTTLS port and, for TLS, on the implicit TLS port too.
func TestOpenRelayMatrix(t *testing.T) {
	for _, tc := range []struct {
		trusted, auth, tls bool
		loopbackAuth       bool   // InsecureAuthFromLoopback, as main sets it
		authReply          string // "" when AUTH is not tried
		relays             bool
	}{
		{trusted: false, auth: false, tls: false, relays: false},
		{trusted: false, auth: false, tls: true, relays: false},
		{trusted: false, auth: true, tls: false, authReply: "538 5.7.11", relays: false},
		{trusted: false, auth: true, tls: true, authReply: "235 ", relays: true},
		{trusted: true, auth: false, tls: false, relays: true},
		{trusted: true, auth: false, tls: true, relays: true},
		{trusted: true, auth: true, tls: false, authReply: "235 ", relays: true},
		{trusted: true, auth: true, tls: true, authReply: "235 ", relays: true},
		// Loopback only: the password does not cross a network.
		{trusted: false, auth: true, tls: false, loopbackAuth: true, authReply: "235 ", relays: true},
	} {
		name := map[bool]string{true: "trusted", false: "untrusted"}[tc.trusted] + "/" +
			map[bool]string{true: "auth", false: "noauth"}[tc.auth] + "/" +
			map[bool]string{true: "tls", false: "plain"}[tc.tls]
		if tc.loopbackAuth {
			name += "/insecure_auth_from_loopback"
		}
		t.Run(name, func(t *testing.T) {
			e := start(t, func(o *Options) {
				o.InsecureAuthFromLoopback = tc.loopbackAuth
				o.Users[0].AllowedSenders = []string{"*@example.com"}
				if tc.trusted {
					o.TrustedNetworks = []netip.Prefix{mustPrefix(t, "127.0.0.0/8")}
				} else {
					o.TrustedNetworks = []netip.Prefix{mustPrefix(t, "192.0.2.0/24")}
				}
			})
			ports := []string{"starttls"}
			if tc.tls {
				ports = append(ports, "implicit")
			}
			for _, port := range ports {
				var d *dialogue
				if port == "implicit" {
					nc, err := tls.Dial("tcp", e.srv.TLSAddr().String(), e.clientTLS())
					if err != nil {
						t.Fatal(err)
					}
					t.Cleanup(func() { nc.Close() })
					d = &dialogue{t: t, nc: nc, r: bufio.NewReader(nc)}
					d.expect("220 ")
				} else {
					d = dial(t, e.srv.Addr())
				}
				ehlo := d.cmd("EHLO client.test", "250")
				if tc.tls && port == "starttls" {
					d.cmd("STARTTLS", "220")
					d.starttls(e.clientTLS())
					ehlo = d.cmd("EHLO client.test", "250")
				}
				if tc.auth {
					if offered := strings.Contains(ehlo, "AUTH PLAIN"); offered != strings.HasPrefix(tc.authReply, "235") {
						t.Errorf("%s: AUTH offered = %v, but AUTH answers %s", port, offered, tc.authReply)
					}
					d.cmd(authPlainLine(testUser, testPassword), tc.authReply)
				}
				if !tc.relays {
					d.cmd("MAIL FROM:<app@example.com>", "530 5.7.0")
					d.cmd("RCPT TO:<victim@example.org>", "5")
					d.cmd("DATA", "5")
					continue
				}
				if tc.auth {
					// An authenticated user is held to allowed_senders, even
					// from a trusted network.
					d.cmd("MAIL FROM:<ceo@example.net>", "553 5.7.1")
				}
				d.cmd("MAIL FROM:<app@example.com>", "250")
				d.cmd("RCPT TO:<someone@example.org>", "250")
				d.cmd("DATA", "354")
				d.write(testMessage + ".\r\n")
				d.expect("250 2.0.0")
			}
			want := 0
			if tc.relays {
				want = len(ports)
			}
			wantQueued(t, e, want)
		})
	}
}
