package world

import (
	"crypto/tls"
	"io"
	"log"
	"net"
	"net/http"
	"strings"
	"time"
)

// policyServer serves https://mta-sts.DOMAIN/.well-known/mta-sts.txt for
// the enforce domains, each policy naming the domain's own MX host.
type policyServer struct {
	srv  *http.Server
	addr string
}

func startPolicy(addr string, certs *certStore, domains int) (*policyServer, error) {
	policies := make(map[string]string, domains)
	for n := 1; n <= domains; n++ {
		d := Domain(Enforce, n)
		policies["mta-sts."+d] = "version: STSv1\nmode: enforce\nmx: " + MXHost(d) + "\nmax_age: 604800\n"
	}
	l, err := net.Listen("tcp", addr)
	if err != nil {
		return nil, err
	}
	s := &policyServer{addr: l.Addr().String(), srv: &http.Server{
		Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			host, _, err := net.SplitHostPort(r.Host)
			if err != nil {
				host = r.Host
			}
			policy, ok := policies[strings.ToLower(host)]
			if !ok || r.URL.Path != "/.well-known/mta-sts.txt" {
				http.NotFound(w, r)
				return
			}
			w.Header().Set("Content-Type", "text/plain")
			io.WriteString(w, policy)
		}),
		TLSConfig:         &tls.Config{GetCertificate: certs.get, MinVersion: tls.VersionTLS12},
		ReadHeaderTimeout: 10 * time.Second,
		ErrorLog:          log.New(io.Discard, "", 0),
	}}
	go s.srv.ServeTLS(l, "", "")
	return s, nil
}

func (s *policyServer) close() error { return s.srv.Close() }
