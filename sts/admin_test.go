package sts_test

import (
	"net/http"
	"path/filepath"
	"strings"
	"testing"

	"github.com/stsrelay/stsrelay/admin"
	"github.com/stsrelay/stsrelay/sts"
)

// controlSocket serves m's admin routes on a real unix socket.
func controlSocket(t *testing.T, m *sts.Manager) *admin.Client {
	t.Helper()
	mux := http.NewServeMux()
	m.RegisterAdmin(mux)
	path := filepath.Join(t.TempDir(), admin.SocketName)
	srv, err := admin.Listen(path, mux, nil)
	if err != nil {
		t.Fatal(err)
	}
	go srv.Serve()
	t.Cleanup(func() { srv.Close() })
	return admin.Dial(path)
}

func TestAdminListsShowsRefreshesAndPurges(t *testing.T) {
	e := newEnv(t)
	h := e.ValidHost("example.com", "id1", enforcePolicy)
	m := e.Manager(nil)
	c := controlSocket(t, m)

	var list []sts.PolicyInfo
	if err := c.Call(ctx, "GET", "/sts", nil, &list); err != nil || len(list) != 0 {
		t.Fatalf("empty cache: %+v, %v", list, err)
	}
	var info sts.PolicyInfo
	if err := c.Call(ctx, "POST", "/sts/example.com/refresh", nil, &info); err != nil {
		t.Fatal(err)
	}
	if info.Domain != "example.com" || info.ID != "id1" || info.Mode != sts.ModeEnforce || info.MaxAge != 604800 || len(info.MX) != 2 {
		t.Fatalf("refresh returned %+v", info)
	}
	if err := c.Call(ctx, "GET", "/sts", nil, &list); err != nil || len(list) != 1 || list[0].Domain != "example.com" {
		t.Fatalf("list: %+v, %v", list, err)
	}
	if err := c.Call(ctx, "GET", "/sts/EXAMPLE.com", nil, &info); err != nil || info.ID != "id1" {
		t.Fatalf("show: %+v, %v", info, err)
	}
	// Refresh ignores the backoff and the unchanged id: a second fetch.
	if err := c.Call(ctx, "POST", "/sts/example.com/refresh", nil, &info); err != nil || h.requests.Load() != 2 {
		t.Fatalf("second refresh: %v, %d fetches", err, h.requests.Load())
	}
	if err := c.Call(ctx, "DELETE", "/sts/example.com", nil, nil); err != nil {
		t.Fatal(err)
	}
	err := c.Call(ctx, "GET", "/sts/example.com", nil, &info)
	if err == nil || !strings.Contains(err.Error(), "no cached MTA-STS policy for example.com") {
		t.Fatalf("after purge: %v", err)
	}
}

func TestAdminRefreshReportsFetchFailure(t *testing.T) {
	e := newEnv(t)
	e.PolicyHost("example.com", "id1", enforcePolicy, e.CA.Issue(t, "wrong.example.com"))
	c := controlSocket(t, e.Manager(nil))
	err := c.Call(ctx, "POST", "/sts/example.com/refresh", nil, nil)
	if err == nil || !strings.Contains(err.Error(), "certificate") {
		t.Fatalf("err = %v, want the certificate failure", err)
	}
}
