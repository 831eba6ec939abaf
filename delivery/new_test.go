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
		{"duplicate override", func(o *Options) {
			o.Overrides = []Override{{Domains: []string{"a.example"}, TLS: policy.SecurityVerify}, {Domains: []string{"A.example."}, TLS: policy.SecurityMay}}
		}, "entries 0 and 1 both match domain a.example"},
		{"empty override domain", func(o *Options) { o.Overrides = []Override{{TLS: policy.SecurityVerify}} }, "empty domain"},
		{"unknown override level", func(o *Options) { o.Overrides = []Override{{Domains: []string{"a.example"}, TLS: 42}} }, "unknown tls level"},
		{"bad nexthop", func(o *Options) { o.Routes = []Route{{Name: "r", Domains: []string{"*"}, Nexthop: "[x"}} }, "r: \"[x\" is not a nexthop"},
		{"route without domains", func(o *Options) { o.Routes = []Route{{Name: "r", Nexthop: "x.example"}} }, "r: domains: none given"},
		{"auth in the clear", func(o *Options) {
			o.Routes = []Route{{Name: "r", Domains: []string{"*"}, Nexthop: "x.example", TLS: "none", Auth: &Credentials{"u", "p"}}}
		}, "password in the clear"},
		{"routes tie", func(o *Options) {
			o.Routes = []Route{{Name: "a", Domains: []string{"*"}, Nexthop: "x.example"}, {Name: "b", Domains: []string{"*"}, Nexthop: "y.example"}}
		}, "routes: entries 0 and 1 both match domain *"},
		{"limit on both", func(o *Options) {
			o.Limits = []Limit{{Domains: []string{"a.example"}, MXHosts: []string{".b.example"}, Shaping: Shaping{MaxConnections: 1}}}
		}, "domains or mx_hosts"},
	} {
		o := good
		tc.mod(&o)
		if _, err := New(o); err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%s: err = %v, want %q", tc.name, err, tc.want)
		}
	}
}
