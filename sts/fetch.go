package sts

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"io"
	"net/http"
	"strconv"
	"strings"
	"time"

	"github.com/stsrelay/stsrelay/policy"
)

const (
	// MaxPolicySize caps the policy body (RFC 8461 §3.3 suggests 64 KB).
	MaxPolicySize = 64 << 10
	// DefaultFetchTimeout bounds a whole fetch: DNS, connect, TLS, headers
	// and body. RFC 8461 §3.3 suggests a timeout of one minute, and says
	// policy hosts SHOULD answer within it: a host that takes 20 seconds
	// conforms, and giving up on it earlier would deliver without its
	// policy.
	DefaultFetchTimeout = time.Minute
	// MaxFetchTimeout bounds sts.fetch_timeout: twice the minute of RFC
	// 8461 §3.3. A policy host slower than that is down for any purpose,
	// and the CLI's calls to the daemon (an sts refresh waits for a
	// fetch) must end too.
	MaxFetchTimeout = 2 * time.Minute
	// DefaultFetchWait is how long a delivery waits for a fetch before it
	// defers; the fetch goes on in the background up to FetchTimeout, so
	// a slow policy host does not hold a delivery worker for a minute.
	DefaultFetchWait = 5 * time.Second
	// maxHeaderBytes bounds the response headers of the policy host.
	maxHeaderBytes = 16 << 10
)

// Result types of RFC 8460 §4.3.2 for a failure to get a policy.
const (
	ResultFetchError    = policy.ResultSTSPolicyFetchError
	ResultPolicyInvalid = policy.ResultSTSPolicyInvalid
	ResultWebPKIInvalid = policy.ResultSTSWebPKIInvalid
)

// FetchError is a failed policy fetch, classified as TLSRPT reports it.
type FetchError struct {
	Domain     string
	ResultType policy.ResultType // ResultFetchError, ResultPolicyInvalid or ResultWebPKIInvalid
	Err        error
}

func (e *FetchError) Error() string {
	return fmt.Sprintf("fetching MTA-STS policy of %s: %v", e.Domain, e.Err)
}

func (e *FetchError) Unwrap() error { return e.Err }

// PolicyURL is where the policy of domain is published (RFC 8461 §3.3).
func PolicyURL(domain string) string {
	return "https://mta-sts." + domain + "/.well-known/mta-sts.txt"
}

// classicalGroups are the key exchange groups a policy fetch offers.
var classicalGroups = []tls.CurveID{tls.X25519, tls.CurveP256, tls.CurveP384, tls.CurveP521}

// newHTTPClient builds the client for policy fetches. Addresses come from
// the configured resolver, like every other lookup of stsrelay, so the
// policy host may be a CNAME (hosted MTA-STS services need that).
func newHTTPClient(opts *Options, timeout time.Duration) *http.Client {
	t := &http.Transport{
		// No proxy from the environment: only an explicitly configured one.
		Proxy:       opts.Proxy,
		DialContext: opts.Resolver.Dialer(opts.DialContext, timeout),
		TLSClientConfig: &tls.Config{
			// RFC 8461 §3.3: the certificate must be valid for the
			// policy host and chain to a trusted root; nil RootCAs
			// means the system roots, which honour SSL_CERT_FILE and
			// SSL_CERT_DIR. Go checks DNS-IDs only, with a wildcard
			// only as the whole left-most label (RFC 6125).
			RootCAs:    opts.RootCAs,
			MinVersion: tls.VersionTLS12, // RFC 8461 §7.2 for SMTP; the same floor here
			// Go's default groups without the post-quantum hybrids. A
			// policy is public: the fetch needs the host's
			// authenticity, which rests on the certificate's
			// signature, not on the key exchange. A hybrid keeps
			// recorded traffic secret, which a policy need not be,
			// and costs a fifth of each handshake, paid at every first
			// contact with a domain. P-384 and P-521 stay for hosts
			// configured with nothing else. Delivery and TLS reports
			// keep Go's default.
			CurvePreferences: classicalGroups,
		},
		DisableKeepAlives:      true, // fetches are rare; keep no idle sockets
		MaxResponseHeaderBytes: maxHeaderBytes,
		ForceAttemptHTTP2:      false,
	}
	return &http.Client{
		Transport: t,
		// RFC 8461 §3.3: HTTP 3xx redirects MUST NOT be followed.
		CheckRedirect: func(*http.Request, []*http.Request) error { return http.ErrUseLastResponse },
		// No Jar: cookies are neither sent nor kept. net/http has no HTTP
		// cache, as RFC 8461 §3.3 wants.
	}
}

// Fetch retrieves and parses the policy of domain over HTTPS, without
// looking at the cache or at DNS for the TXT record. Errors are *FetchError.
func (m *Manager) Fetch(ctx context.Context, domain string) (*Policy, error) {
	d, err := policyDomain(domain)
	if err != nil {
		return nil, &FetchError{Domain: domain, ResultType: ResultFetchError, Err: err}
	}
	ctx, cancel := context.WithTimeout(ctx, m.fetchTimeout)
	defer cancel()
	p, err := m.fetch(ctx, d)
	if err != nil {
		return nil, &FetchError{Domain: d, ResultType: classify(err), Err: err}
	}
	return p, nil
}

// errInvalid marks errors about the policy's content rather than its transport.
var errInvalid = errors.New("invalid policy")

func (m *Manager) fetch(ctx context.Context, domain string) (*Policy, error) {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, PolicyURL(domain), nil)
	if err != nil {
		return nil, err
	}
	req.Header.Set("User-Agent", "stsrelay")
	resp, err := m.http.Do(req)
	if err != nil {
		return nil, err
	}
	defer resp.Body.Close()
	// RFC 8461 §3.3: only HTTP 200 is a valid policy; a redirect was not
	// followed and lands here too.
	if resp.StatusCode != http.StatusOK {
		if loc := resp.Header.Get("Location"); loc != "" {
			return nil, fmt.Errorf("HTTP %d redirect to %.100q is not followed (RFC 8461 §3.3)", resp.StatusCode, loc)
		}
		return nil, fmt.Errorf("HTTP status %d, want 200", resp.StatusCode)
	}
	// RFC 8461 §3.2: the media type is text/plain and "additional
	// Content-Type parameters are ignored", malformed ones included
	// (mime.ParseMediaType fails on "text/plain; utf-8" or two charsets).
	ct := resp.Header.Get("Content-Type")
	if mt, _, _ := strings.Cut(ct, ";"); !strings.EqualFold(strings.TrimSpace(mt), "text/plain") {
		if ct == "" {
			return nil, fmt.Errorf("%w: no Content-Type, want text/plain", errInvalid)
		}
		return nil, fmt.Errorf("%w: Content-Type %q is not text/plain", errInvalid, truncate(ct))
	}
	// RFC 8461 §3.3: the body is bounded; read one byte more to tell.
	body, err := io.ReadAll(io.LimitReader(resp.Body, MaxPolicySize+1))
	if err == nil && ctx.Err() != nil {
		// When the fetch timeout cuts a body short, net/http sometimes
		// reports a clean end; the part read must not pass for the policy.
		err = context.Cause(ctx)
	}
	if err != nil {
		return nil, fmt.Errorf("reading policy: %w", err)
	}
	if len(body) > MaxPolicySize {
		return nil, fmt.Errorf("%w: larger than %s bytes", errInvalid, strconv.Itoa(MaxPolicySize))
	}
	p, err := Parse(body)
	if err != nil {
		return nil, fmt.Errorf("%w: %w", errInvalid, err)
	}
	return p, nil
}

// classify maps a fetch error to its RFC 8460 §4.3.2 result type.
func classify(err error) policy.ResultType {
	var (
		verr *tls.CertificateVerificationError
		herr x509.HostnameError
		uerr x509.UnknownAuthorityError
		cerr x509.CertificateInvalidError
	)
	switch {
	case errors.Is(err, errInvalid):
		return ResultPolicyInvalid
	case errors.As(err, &verr), errors.As(err, &herr), errors.As(err, &uerr), errors.As(err, &cerr):
		return ResultWebPKIInvalid
	}
	return ResultFetchError
}
