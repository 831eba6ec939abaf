package sts_test

import (
	"context"
	"crypto/tls"
	"errors"
	"github.com/stsrelay/stsrelay/policy"
	"net/http"
	"os"
	"os/exec"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/stsrelay/stsrelay/internal/testpki"
	"github.com/stsrelay/stsrelay/sts"
)

// fetchFails fetches example.com's policy through Policy, expects no
// policy, and returns the *FetchError behind it.
func fetchFails(t *testing.T, e *env, mod func(*sts.Options)) *sts.FetchError {
	t.Helper()
	m := e.Manager(mod)
	cp, err := m.Policy(context.Background(), "example.com")
	if !errors.Is(err, sts.ErrNoPolicy) {
		t.Fatalf("Policy = %+v, %v; want ErrNoPolicy", cp, err)
	}
	var fe *sts.FetchError
	if !errors.As(err, &fe) {
		t.Fatalf("err = %v, want a *FetchError", err)
	}
	return fe
}

func wantResult(t *testing.T, fe *sts.FetchError, resultType policy.ResultType) {
	t.Helper()
	if fe.ResultType != resultType {
		t.Fatalf("result type %q (%v), want %q", fe.ResultType, fe, resultType)
	}
}

func TestFetchAcceptsTextPlainWithCharset(t *testing.T) {
	e := newEnv(t)
	h := e.ValidHost("example.com", "id1", enforcePolicy)
	cp, err := e.Manager(nil).Policy(context.Background(), "example.com")
	if err != nil || cp.Policy.Mode != sts.ModeEnforce || cp.ID != "id1" {
		t.Fatalf("got %+v, %v", cp, err)
	}
	if got := cp.Expires.Sub(cp.Fetched); got != 604800*time.Second {
		t.Fatalf("expiry %v after fetch, want max_age", got)
	}
	// RFC 8461 §7.1 / §3.3: SNI is the policy host.
	if len(h.serverNames) != 1 || h.serverNames[0] != "mta-sts.example.com" {
		t.Fatalf("SNI %q, want mta-sts.example.com", h.serverNames)
	}
}

// RFC 8461 §3.2: the media type is text/plain and further Content-Type
// parameters are ignored, so a malformed one must not make the policy
// invalid, which would deliver as if the domain had no MTA-STS.
func TestFetchIgnoresMalformedContentTypeParameters(t *testing.T) {
	for _, ct := range []string{
		"text/plain; utf-8",
		"text/plain;; charset=utf-8",
		"text/plain; charset=",
		"text/plain; charset=utf-8; charset=us-ascii",
		"Text/Plain ; charset=\"utf-8",
	} {
		t.Run(ct, func(t *testing.T) {
			e := newEnv(t)
			h := e.ValidHost("example.com", "id1", enforcePolicy)
			h.mu.Lock()
			h.contentType = ct
			h.mu.Unlock()
			cp, err := e.Manager(nil).Policy(ctx, "example.com")
			if err != nil || cp.Policy.Mode != sts.ModeEnforce {
				t.Fatalf("Content-Type %q: %+v, %v; want the enforce policy", ct, cp, err)
			}
		})
	}
}

func TestFetchDoesNotFollowRedirects(t *testing.T) {
	e := newEnv(t)
	h := e.ValidHost("example.com", "id1", enforcePolicy)
	var redirected int
	h.handler = func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path == "/elsewhere" {
			redirected++
			w.Header().Set("Content-Type", "text/plain")
			w.Write([]byte(enforcePolicy))
			return
		}
		http.Redirect(w, r, "/elsewhere", http.StatusFound)
	}
	fe := fetchFails(t, e, nil)
	wantResult(t, fe, sts.ResultFetchError)
	if redirected != 0 {
		t.Fatal("the redirect was followed")
	}
	if !strings.Contains(fe.Error(), "redirect") {
		t.Fatalf("error %q does not say it was a redirect", fe)
	}
}

func TestFetchRejectsStatusOtherThan200(t *testing.T) {
	for _, status := range []int{http.StatusNotFound, http.StatusNoContent, http.StatusInternalServerError} {
		e := newEnv(t)
		h := e.ValidHost("example.com", "id1", enforcePolicy)
		h.SetStatus(status)
		wantResult(t, fetchFails(t, e, nil), sts.ResultFetchError)
	}
}

func TestFetchRejectsWrongMediaType(t *testing.T) {
	for ct, says := range map[string]string{
		"text/html; charset=utf-8": `Content-Type "text/html; charset=utf-8" is not text/plain`,
		"application/octet-stream": `Content-Type "application/octet-stream" is not text/plain`,
		"text/plainly":             `Content-Type "text/plainly" is not text/plain`,
		"":                         "no Content-Type",
	} {
		e := newEnv(t)
		h := e.ValidHost("example.com", "id1", enforcePolicy)
		h.contentType = ct
		if ct == "" {
			h.handler = func(w http.ResponseWriter, r *http.Request) {
				w.Header()["Content-Type"] = nil // no sniffing either
				w.Write([]byte(enforcePolicy))
			}
		}
		fe := fetchFails(t, e, nil)
		wantResult(t, fe, sts.ResultPolicyInvalid)
		if !strings.Contains(fe.Error(), says) {
			t.Errorf("error %q does not say %q", fe, says)
		}
	}
}

func TestFetchRejectsOversizedPolicy(t *testing.T) {
	e := newEnv(t)
	// A valid policy padded with ignored extension lines beyond 64 KiB.
	pad := strings.Repeat("x-padding: "+strings.Repeat("a", 100)+"\n", sts.MaxPolicySize/100)
	e.ValidHost("example.com", "id1", enforcePolicy+pad)
	fe := fetchFails(t, e, nil)
	wantResult(t, fe, sts.ResultPolicyInvalid)
	if !strings.Contains(fe.Error(), "larger than") {
		t.Fatalf("error %q does not say the policy was too large", fe)
	}
}

func TestFetchAcceptsPolicyJustUnderTheCap(t *testing.T) {
	e := newEnv(t)
	body := enforcePolicy + "x-padding: "
	body += strings.Repeat("a", sts.MaxPolicySize-len(body)-1) + "\n"
	e.ValidHost("example.com", "id1", body)
	if _, err := e.Manager(nil).Policy(context.Background(), "example.com"); err != nil {
		t.Fatalf("a %d-byte policy was refused: %v", len(body), err)
	}
}

func TestFetchGivesUpAfterFetchTimeout(t *testing.T) {
	e := newEnv(t)
	h := e.ValidHost("example.com", "id1", enforcePolicy)
	h.delay = 5 * time.Second
	start := time.Now()
	fe := fetchFails(t, e, func(o *sts.Options) { o.FetchTimeout = 300 * time.Millisecond })
	if d := time.Since(start); d > 2*time.Second {
		t.Fatalf("fetch took %v with a 300ms timeout", d)
	}
	wantResult(t, fe, sts.ResultFetchError)
}

func TestFetchRejectsCertificateForWrongName(t *testing.T) {
	e := newEnv(t)
	e.PolicyHost("example.com", "id1", enforcePolicy, e.CA.Issue(t, "www.example.com", "example.com"))
	wantResult(t, fetchFails(t, e, nil), sts.ResultWebPKIInvalid)
}

func TestFetchRejectsExpiredCertificate(t *testing.T) {
	e := newEnv(t)
	e.PolicyHost("example.com", "id1", enforcePolicy, e.CA.IssueWith(t, testpki.Options{Expired: true}, "mta-sts.example.com"))
	wantResult(t, fetchFails(t, e, nil), sts.ResultWebPKIInvalid)
}

func TestFetchRejectsUntrustedCertificate(t *testing.T) {
	e := newEnv(t)
	e.PolicyHost("example.com", "id1", enforcePolicy, e.CA.IssueWith(t, testpki.Options{SelfSigned: true}, "mta-sts.example.com"))
	wantResult(t, fetchFails(t, e, nil), sts.ResultWebPKIInvalid)
}

func TestFetchRejectsNameOnlyInCommonName(t *testing.T) {
	e := newEnv(t)
	// RFC 8461 §3.3 / RFC 6125: DNS-IDs only, no CN fallback.
	e.PolicyHost("example.com", "id1", enforcePolicy,
		e.CA.IssueWith(t, testpki.Options{CommonName: "mta-sts.example.com"}, "other.example.com"))
	wantResult(t, fetchFails(t, e, nil), sts.ResultWebPKIInvalid)
}

func TestFetchAcceptsWildcardCertificate(t *testing.T) {
	e := newEnv(t)
	e.PolicyHost("example.com", "id1", enforcePolicy, e.CA.Issue(t, "*.example.com"))
	if _, err := e.Manager(nil).Policy(context.Background(), "example.com"); err != nil {
		t.Fatal(err)
	}
}

func TestFetchFollowsCNAMEOfPolicyHost(t *testing.T) {
	e := newEnv(t)
	// The hosted-service pattern: the cert is for mta-sts.example.com, the
	// name is an alias of the provider's host.
	e2 := e.PolicyHost("hosted.provider.net", "", enforcePolicy, e.CA.Issue(t, "mta-sts.example.com"))
	e.DNS.Add(t, "mta-sts.example.com. 300 IN CNAME mta-sts.hosted.provider.net.")
	e.SetID("example.com", "id1")
	cp, err := e.Manager(nil).Policy(context.Background(), "example.com")
	if err != nil || cp.Policy.Mode != sts.ModeEnforce {
		t.Fatalf("got %+v, %v", cp, err)
	}
	if e2.requests.Load() != 1 {
		t.Fatalf("the CNAME target got %d requests, want 1", e2.requests.Load())
	}
}

func TestFetchTriesNextAddressWhenOneHangs(t *testing.T) {
	e := newEnv(t)
	e.ValidHost("example.com", "id1", enforcePolicy)
	// Addresses are tried IPv6 first: the hanging one comes first.
	e.DNS.Add(t, "mta-sts.example.com. 300 IN AAAA "+blackholeIP)
	m := e.Manager(func(o *sts.Options) { o.FetchTimeout = 2 * time.Second })
	if _, err := m.Policy(ctx, "example.com"); err != nil {
		t.Fatalf("a hanging first address used up the fetch: %v", err)
	}
}

func TestFetchUsesSystemRootsFromSSLCertFile(t *testing.T) {
	// Go reads the system roots once per process, so the test runs itself
	// in a fresh process in which nothing has loaded them yet.
	if os.Getenv("STS_TEST_SYSTEM_ROOTS") == "" {
		cmd := exec.Command(os.Args[0], "-test.run=^TestFetchUsesSystemRootsFromSSLCertFile$", "-test.count=1")
		cmd.Env = append(os.Environ(), "STS_TEST_SYSTEM_ROOTS=1")
		if out, err := cmd.CombinedOutput(); err != nil {
			t.Fatalf("in a fresh process: %v\n%s", err, out)
		}
		return
	}
	e := newEnv(t)
	e.ValidHost("example.com", "id1", enforcePolicy)
	t.Setenv("SSL_CERT_FILE", e.CA.WriteCAFile(t, t.TempDir()))
	t.Setenv("SSL_CERT_DIR", t.TempDir())
	m := e.Manager(func(o *sts.Options) { o.RootCAs = nil })
	if _, err := m.Policy(context.Background(), "example.com"); err != nil {
		t.Fatalf("with SSL_CERT_FILE naming the CA: %v", err)
	}
}

func TestFetchIgnoresProxyEnvironment(t *testing.T) {
	e := newEnv(t)
	e.ValidHost("example.com", "id1", enforcePolicy)
	t.Setenv("HTTPS_PROXY", "http://127.0.0.1:1")
	t.Setenv("https_proxy", "http://127.0.0.1:1")
	if _, err := e.Manager(nil).Policy(context.Background(), "example.com"); err != nil {
		t.Fatalf("fetch went to the environment's proxy: %v", err)
	}
}

func TestFetchSendsNoCookiesAndUsesNoHTTPCache(t *testing.T) {
	e := newEnv(t)
	h := e.ValidHost("example.com", "id1", enforcePolicy)
	var conditional []string
	h.handler = func(w http.ResponseWriter, r *http.Request) {
		conditional = append(conditional, r.Header.Get("If-None-Match")+r.Header.Get("If-Modified-Since"))
		http.SetCookie(w, &http.Cookie{Name: "track", Value: "me"})
		// RFC 8461 §3.3: HTTP caching MUST NOT be used, whatever the
		// server allows.
		w.Header().Set("Cache-Control", "public, max-age=86400")
		w.Header().Set("ETag", `"v1"`)
		w.Header().Set("Last-Modified", "Mon, 02 Jan 2006 15:04:05 GMT")
		w.Header().Set("Content-Type", "text/plain")
		w.Write([]byte(enforcePolicy))
	}
	m := e.Manager(nil)
	for range 2 {
		if _, err := m.Refresh(context.Background(), "example.com"); err != nil {
			t.Fatal(err)
		}
	}
	if len(h.cookies) != 2 || h.cookies[1] != "" {
		t.Fatalf("Cookie headers %q, want none", h.cookies)
	}
	if len(conditional) != 2 || conditional[1] != "" {
		t.Fatalf("requests %d, conditional headers %q; want two plain requests", len(conditional), conditional)
	}
}

func TestFetchRefusesTLSBelow12(t *testing.T) {
	e := newEnv(t)
	e.PolicyHostTLS("example.com", "id1", enforcePolicy, &tls.Config{
		Certificates: []tls.Certificate{e.CA.Issue(t, "mta-sts.example.com")},
		MinVersion:   tls.VersionTLS10,
		MaxVersion:   tls.VersionTLS11,
	})
	wantResult(t, fetchFails(t, e, nil), sts.ResultFetchError)
}

// A policy is public, so its fetch offers only classical key exchange
// (see newHTTPClient); the MX connections keep Go's post-quantum default.
func TestFetchOffersNoPostQuantumKeyExchange(t *testing.T) {
	e := newEnv(t)
	var (
		mu      sync.Mutex
		offered []tls.CurveID
	)
	e.PolicyHostTLS("example.com", "id1", enforcePolicy, &tls.Config{
		Certificates: []tls.Certificate{e.CA.Issue(t, "mta-sts.example.com")},
		GetConfigForClient: func(hello *tls.ClientHelloInfo) (*tls.Config, error) {
			mu.Lock()
			offered = hello.SupportedCurves
			mu.Unlock()
			return nil, nil
		},
	})
	if _, err := e.Manager(nil).Policy(context.Background(), "example.com"); err != nil {
		t.Fatal(err)
	}
	want := []tls.CurveID{tls.X25519, tls.CurveP256, tls.CurveP384, tls.CurveP521}
	mu.Lock()
	defer mu.Unlock()
	if !slices.Equal(offered, want) {
		t.Fatalf("the fetch offered the groups %v, want %v", offered, want)
	}
}

// A host configured with P-384 alone (an old hardening recipe) still
// serves its policy: the fetch offers every classical group.
func TestFetchFromAHostWithP384Only(t *testing.T) {
	e := newEnv(t)
	e.PolicyHostTLS("example.com", "id1", enforcePolicy, &tls.Config{
		Certificates:     []tls.Certificate{e.CA.Issue(t, "mta-sts.example.com")},
		CurvePreferences: []tls.CurveID{tls.CurveP384},
	})
	cp, err := e.Manager(nil).Policy(context.Background(), "example.com")
	if err != nil || cp.ID != "id1" {
		t.Fatalf("got %+v, %v", cp, err)
	}
}

func TestFetchFailureIsRecordedForTLSRPT(t *testing.T) {
	for _, tc := range []struct {
		name   string
		setup  func(e *env)
		result policy.ResultType
	}{
		{"unreachable", func(e *env) { e.SetID("example.com", "id1") }, sts.ResultFetchError},
		{"invalid", func(e *env) { e.ValidHost("example.com", "id1", "version: STSv1\nmode: enforce\n") }, sts.ResultPolicyInvalid},
		{"webpki", func(e *env) {
			e.PolicyHost("example.com", "id1", enforcePolicy, e.CA.Issue(t, "wrong.example.com"))
		}, sts.ResultWebPKIInvalid},
	} {
		t.Run(tc.name, func(t *testing.T) {
			e := newEnv(t)
			tc.setup(e)
			fetchFails(t, e, nil)
			res := e.Rec.Results()
			if len(res) != 1 || res[0].Result != tc.result || res[0].PolicyDomain != "example.com" || res[0].MX != "" {
				t.Fatalf("recorded %+v, want one %s for example.com without MX", res, tc.result)
			}
		})
	}
}
