package delivery

import (
	"strings"
	"testing"

	"github.com/stsrelay/stsrelay/policy"
	"github.com/stsrelay/stsrelay/resolve"
)

func TestNewRejectsBadOptions(t *testing.T) {
	r, err := resolve.New(resolve.Config{Servers: []string{"127.0.0.1:53"}})
	if err != nil {
		t.Fatal(err)
	}
	good := Options{Hostname: "relay.example.com", Resolver: r}
	if _, err := New(good); err != nil {
		t.Fatalf("good options rejected: %v", err)
	}
	for _, tc := range []struct {
		name string
		mod  func(o *Options)
		want string
	}{
		{"no hostname", func(o *Options) { o.Hostname = "" }, "hostname is required"},
		{"hostname with space", func(o *Options) { o.Hostname = "relay example" }, "not a host name"},
		{"no resolver", func(o *Options) { o.Resolver = nil }, "resolver is required"},
		{"bad ip version", func(o *Options) { o.IPVersion = 5 }, "ip_version"},
		{"bad port", func(o *Options) { o.Port = 70000 }, "not a TCP port"},
		{"duplicate override", func(o *Options) {
			o.Overrides = []Override{{Domain: "a.example", TLS: policy.SecurityVerify}, {Domain: "A.example.", TLS: policy.SecurityMay}}
		}, `two policy overrides for domain "a.example"`},
		{"empty override domain", func(o *Options) { o.Overrides = []Override{{TLS: policy.SecurityVerify}} }, "empty domain"},
		{"unknown override level", func(o *Options) { o.Overrides = []Override{{Domain: "a.example", TLS: 42}} }, "unknown tls level"},
	} {
		o := good
		tc.mod(&o)
		if _, err := New(o); err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%s: err = %v, want %q", tc.name, err, tc.want)
		}
	}
}
